"""The pytest plugin's --socklab-kernel: one run of each kernel-using test per kernel."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_model_tests_run_once_per_kernel_with_that_kernels_rules(pytester):
    pytester.makepyfile("""
        def test_optmem(model, socklab_kernel):
            expected = {"6.1": 20480, "7.2": 131072}[socklab_kernel]
            assert model["server"].sysctls["net.core.optmem_max"] == expected
        """)
    result = pytester.runpytest("--socklab-kernel", "6.1", "--socklab-kernel", "7.2",
                                "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_optmem?kernel-6.1? PASSED*", "*test_optmem?kernel-7.2? PASSED*"])


def test_a_recipe_name_is_accepted_as_a_kernel(pytester):
    pytester.makepyfile("""
        def test_series(model):
            assert model["client"].kernel == "6.12"
        """)
    result = pytester.runpytest("--socklab-kernel", "trixie", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_each_xdist_worker_but_the_first_gets_a_lab_of_its_own():
    from harness.pytest_plugin import lab_name

    assert lab_name({}) == "default"
    assert lab_name({"SOCKLAB_LAB": "speed"}) == "speed"
    assert lab_name({"SOCKLAB_LAB": "speed", "PYTEST_XDIST_WORKER": "gw0"}) == "speed"
    assert lab_name({"SOCKLAB_LAB": "speed", "PYTEST_XDIST_WORKER": "gw1"}) == "speed-gw1"
    assert lab_name({"PYTEST_XDIST_WORKER": "gw3"}) == "default-gw3"
    long = "a" * 32
    assert lab_name({"SOCKLAB_LAB": long, "PYTEST_XDIST_WORKER": "gw1"}) == "a" * 28 + "-gw1"
