"""The throughput benchmark runs and reports the figures a later `invoke bench` prints."""

from harness.model import bench


def test_measure_reports_median_min_max():
    figures = bench.measure(n_calls=2000, repeats=2)
    assert figures["repeats"] == 2 and figures["calls_per_repeat"] > 1000
    assert figures["min"] <= figures["median"] <= figures["max"]
    assert figures["wall_min"] <= figures["wall_median"] <= figures["wall_max"]


def test_main_prints(capsys):
    bench.main(["--calls", "500", "--repeats", "1"])
    assert "model throughput" in capsys.readouterr().out


def test_round_makes_the_expected_number_of_calls():
    net, server, client, lfd, ufd = bench._setup()
    calls = []
    original = type(server).call

    def counting(self, op, args=None, user="root"):
        calls.append(op)
        return original(self, op, args, user)

    type(server).call = counting
    try:
        bench._round(server, client, lfd, ufd)
    finally:
        type(server).call = original
    assert len(calls) == bench.CALLS_PER_ROUND + 2
