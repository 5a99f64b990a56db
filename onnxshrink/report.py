"""Plain-text tables for reports and the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manager import Report


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _fidelity_text(fidelity: dict) -> str:
    if not fidelity:
        return "-"
    parts = [f"cos {fidelity['cosine']:.6f}"] if "cosine" in fidelity else []
    if "top1" in fidelity:
        parts.append(f"top1 {fidelity['top1']:.4f}")
    if "max_abs" in fidelity:
        parts.append(f"max-abs {fidelity['max_abs']:.2e}")
    return ", ".join(parts)


def pass_table(report: "Report") -> str:
    rows = [["(input)", "", f"{report.input.params:,}", human_bytes(report.input.bytes), report.input.nodes, "", "", ""]]
    for p in report.passes:
        rows.append([p.spec, p.status, f"{p.after.params:,}", human_bytes(p.after.bytes), p.after.nodes,
                     _fidelity_text(p.fidelity), f"{p.wall_s:.2f}", f"{p.peak_rss_mb:.0f}"])
    rows.append(["(output)", "", f"{report.output.params:,}", human_bytes(report.output.bytes), report.output.nodes,
                 _fidelity_text(report.fidelity), "", ""])
    text = table(["pass", "status", "params", "bytes", "nodes", "fidelity vs input", "time s", "peak MB"], rows,
                 "llrrrlrr")
    ratio = report.output.bytes / report.input.bytes if report.input.bytes else 1.0
    text += f"\nsize {human_bytes(report.input.bytes)} -> {human_bytes(report.output.bytes)} ({ratio:.3f}x); " \
            f"fidelity on {report.samples} samples of {report.data}"
    for p in report.rolled_back:
        text += f"\n{p.message}"
    return text
