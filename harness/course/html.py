"""Pictures of a run and an HTML report that embeds them.

``sequence_svg`` draws both hosts' steps as a sequence diagram: one lifeline
per host, each call with its result and the kernel function the model names,
an arrow where a call reaches the other host, snapshots as dashed rules.
``occupancy_svg`` plots, for every snapshot, the queues and buffers ``ss -m``
showed (Recv-Q, Send-Q, skmem r and w of the lab's sockets): labs 06 and 08
are about exactly that. ``write_report`` puts them as SVG files next to
``report.html``, which references them (so a browser proves they load).
Everything is plain SVG and HTML, written here; no scripts but a two-line
check that the images loaded, no external resources.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..scenario.runner import LAB_ADDRESSES, crosses_hosts
from . import state

_ROW = 34
_HEAD = 60
_COLUMN = 430
_LEFT = 40
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, limit: int = 58) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sequence_svg(result: Any, blind: bool = False) -> str:
    """The run as a sequence diagram (SVG text)."""
    hosts = list(result.scenario.hosts)
    x = {host: _LEFT + 150 + i * _COLUMN for i, host in enumerate(hosts)}
    width = _LEFT + 150 + len(hosts) * _COLUMN
    rows = [r for r in result.records]
    height = _HEAD + _ROW * (len(rows) + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
           '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z" fill="#444"/></marker></defs>',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{_LEFT}" y="20" font-size="14" font-weight="bold">{_esc(result.scenario.name)}</text>']
    for host in hosts:
        out.append(f'<rect x="{x[host] - 50}" y="30" width="100" height="22" fill="#eef" stroke="#446"/>'
                   f'<text x="{x[host]}" y="45" text-anchor="middle" font-weight="bold">{_esc(host)}</text>'
                   f'<line x1="{x[host]}" y1="52" x2="{x[host]}" y2="{height - 10}" stroke="#99a" '
                   'stroke-dasharray="4,3"/>')
    for number, record in enumerate(rows):
        y = _HEAD + _ROW * number + 14
        step = record.step
        out.append(f'<text x="{_LEFT - 30}" y="{y + 4}" fill="#888">{step.index}</text>')
        if step.kind == "snapshot":
            out.append(f'<line x1="{_LEFT}" y1="{y}" x2="{width - 10}" y2="{y}" stroke="#2a7" stroke-dasharray="6,4"/>'
                       f'<text x="{_LEFT + 4}" y="{y - 3}" fill="#2a7">snapshot {_esc(step.snapshot)}</text>')
            continue
        if step.kind == "sleep":
            out.append(f'<text x="{_LEFT + 4}" y="{y + 4}" fill="#888">sleep {step.seconds:g} s</text>')
            continue
        host_x = x.get(step.host, _LEFT)
        kernel = record.kernel.describe() if record.kernel else ""
        model = record.model.describe() if record.model else ""
        failed = record.verdict is not None and not record.verdict.ok
        colour = "#c00" if failed else "#333"
        out.append(f'<circle cx="{host_x}" cy="{y}" r="4" fill="{colour}"/>'
                   f'<text x="{host_x + 10}" y="{y - 2}" fill="{colour}">{_esc(_short(step.describe()))}</text>')
        result_text = f"→ {kernel}" if kernel else ""
        if model and not blind and model != kernel:
            result_text += f"  (model {model})"
        elif model and not blind and not kernel:
            result_text = f"→ model {model}"
        if record.model and record.model.kernel_fn and not blind:
            result_text += f"  [{record.model.kernel_fn}]"
        out.append(f'<text x="{host_x + 10}" y="{y + 11}" fill="#555">{_esc(_short(result_text, 66))}</text>')
        if crosses_hosts(step):
            target = next((h for h, a in LAB_ADDRESSES.items() if a == step.args["addr"][0]), None)
            if target in x and target != step.host:
                out.append(f'<line x1="{host_x}" y1="{y + 3}" x2="{x[target] + (-6 if x[target] > host_x else 6)}" '
                           f'y2="{y + 3}" stroke="#444" marker-end="url(#arrow)"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def occupancy_series(result: Any) -> tuple[list[str], dict[str, list[float | None]]]:
    """(snapshot names, {series: value at each snapshot}) for the lab sockets' queues and memory."""
    names = list(result.kernel_snapshots)
    series: dict[str, list[float | None]] = {}
    for position, name in enumerate(names):
        for host, snapshot in result.kernel_snapshots[name].items():
            for sock in state.lab_sockets(snapshot):
                if sock.netid != "tcp" or sock.state not in ("ESTAB", "LISTEN"):
                    continue
                where = f"{host} {sock.local.port}→{sock.peer.port}" if sock.state == "ESTAB" else \
                    f"{host} listener {sock.local.port}"
                figures = {"Recv-Q": sock.recv_q} if sock.state == "LISTEN" else {
                    "Recv-Q": sock.recv_q, "Send-Q": sock.send_q,
                    "skmem r": getattr(sock.skmem, "sk_rmem_alloc", None) if sock.skmem else None,
                    "skmem w": getattr(sock.skmem, "sk_wmem_queued", None) if sock.skmem else None}
                for figure, value in figures.items():
                    key = f"{where}: {figure}"
                    series.setdefault(key, [None] * len(names))[position] = value
    # A series that is zero throughout tells nothing; keep the ones that moved.
    moving = {key: values for key, values in series.items() if any(v for v in values if v is not None)}
    return names, moving


def occupancy_svg(result: Any) -> str | None:
    """A line plot of every moving queue and buffer over the run's snapshots; None when nothing moved."""
    names, series = occupancy_series(result)
    if len(names) < 2 or not series:
        return None
    series = dict(sorted(series.items())[: len(_PALETTE)])
    width, height, left, top, plot_h = 900, 420, 80, 40, 260
    plot_w = width - left - 40
    peak = max(v for values in series.values() for v in values if v is not None) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14" font-weight="bold">{_esc(result.scenario.name)}: '
           'queues and buffers at each snapshot (bytes; a listener\'s Recv-Q in connections)</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
    for tick in range(5):
        value = peak * tick / 4
        y = top + plot_h - plot_h * tick / 4
        out.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{value:,.0f}</text>'
                   f'<line x1="{left}" y1="{y}" x2="{left + plot_w}" y2="{y}" stroke="#eee"/>')

    def px(index: int) -> float:
        return left + (plot_w * index / (len(names) - 1))

    for index, name in enumerate(names):
        out.append(f'<text x="{px(index)}" y="{top + plot_h + 16}" text-anchor="middle">{_esc(name)}</text>')
    for number, (key, values) in enumerate(series.items()):
        colour = _PALETTE[number]
        points = [(px(i), top + plot_h - plot_h * v / peak) for i, v in enumerate(values) if v is not None]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in points) + '"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in points]
        out.append(f'<rect x="{left + (number % 2) * 400}" y="{top + plot_h + 30 + (number // 2) * 16}" width="10" '
                   f'height="10" fill="{colour}"/><text x="{left + 14 + (number % 2) * 400}" '
                   f'y="{top + plot_h + 39 + (number // 2) * 16}">{_esc(key)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# A two-line check, for people and the browser test alike: how many images really loaded.
_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.documentElement.setAttribute("data-images-loaded", loaded + "/" + images.length);
});
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: .25em .5em; font-size: 13px; vertical-align: top; }
td.ok { color: #176b2c; } td.fail { color: #b00020; font-weight: bold; } td.np { color: #8a6d00; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
code { background: #f4f4f4; }
</style>"""


def _table(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{cls}">{_esc(text)}</td>' for text, cls in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(report: Any, directory: Path, blind: bool = False) -> Path:
    """``report.html`` and its SVG pictures (one sequence diagram per run, occupancy plots) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = report.counts
    verdict = "PASS" if report.ok else "FAIL"
    parts = [f"<h1>{_esc(report.title)}</h1>",
             f"<p><b>{verdict}</b>: {counts['steps'] - counts['step_failures']}/{counts['steps']} steps agree, "
             f"{counts['assertions'] - counts['assertion_failures'] - counts.get('not_predicted', 0)}/"
             f"{counts['assertions']} expectations hold{'' if report.kernel else ' on the model'}.</p>"]
    if blind:
        parts.append("<p><i>Blind: the model's answers and the expected values are hidden (--reveal shows them).</i></p>")
    for number, result in enumerate(report.runs, start=1):
        stem = f"{number:02d}-{result.scenario.name}"
        (directory / f"{stem}.sequence.svg").write_text(sequence_svg(result, blind=blind))
        parts += [f"<h2>{_esc(result.scenario.name)}</h2>", f"<p>{_esc(result.scenario.description)}</p>",
                  f'<img src="{stem}.sequence.svg" alt="sequence diagram of {_esc(result.scenario.name)}">']
        plot = occupancy_svg(result)
        if plot is not None:
            (directory / f"{stem}.occupancy.svg").write_text(plot)
            parts.append(f'<img src="{stem}.occupancy.svg" alt="queue and buffer occupancy of '
                         f'{_esc(result.scenario.name)}">')
        rows = []
        for record in result.records:
            if record.step.kind != "call":
                continue
            ok = record.verdict is None or record.verdict.ok
            row = [(str(record.step.index), ""), (record.step.host, ""), (record.step.describe(), ""),
                   (record.kernel.describe() if record.kernel else "", "")]
            if not blind:
                row += [(record.model.describe() if record.model else "", ""),
                        (f"{record.model.kernel_fn}: {record.model.rule}" if record.model else "", "")]
            row.append(("ok" if ok else "FAIL: " + "; ".join(record.verdict.problems), "ok" if ok else "fail"))
            rows.append(row)
        header = ["#", "host", "call", "kernel", *([] if blind else ["model", "rule (kernel function)"]), "verdict"]
        parts.append(_table(header, rows))
        if result.error:
            parts.append(f"<p class='fail'>Aborted: {_esc(result.error)}</p>")
        for name, hosts in result.kernel_snapshots.items():
            socket_rows = []
            for host, snapshot in hosts.items():
                for sock in state.lab_sockets(snapshot):
                    socket_rows.append([(host, ""), (sock.netid, ""), (sock.state, ""), (str(sock.local), ""),
                                        (str(sock.peer), ""), (str(sock.recv_q), ""), (str(sock.send_q), ""),
                                        (state._skmem(sock), "")])
            if socket_rows:
                parts += [f"<h3>snapshot {_esc(name)}</h3>",
                          _table(["host", "netid", "state", "local", "peer", "Recv-Q", "Send-Q", "skmem"], socket_rows)]
    if report.assertions:
        rows = []
        for outcome in report.assertions:
            name = outcome.assertion.ask if blind and outcome.assertion.ask else outcome.assertion.name
            if not outcome.predicted:
                rows.append([(name, ""), ("-", ""), ("not predicted: " + outcome.error, "np")])
            else:
                rows.append([(name, ""), (repr(outcome.value), ""),
                             ("ok" if outcome.ok else f"FAIL {outcome.error}".strip(), "ok" if outcome.ok else "fail")])
        parts += ["<h2>Expectations</h2>", _table(["expectation", "value", "verdict"], rows)]
    for note in report.notes:
        parts.append(f"<p>Note: {_esc(note)}</p>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(report.title)}</title>{_STYLE}</head><body>\n" + "\n".join(parts)
            + f"\n{_IMAGE_CHECK}\n</body></html>\n")
    path = directory / "report.html"
    path.write_text(page)
    return path
