"""docs/gate.md's lost-batches table ("What it was worth") is what `docs/gate/lost_batches.py` wrote to
`docs/gate/lost_batches.json`: each design's GO by look 10 and by look 20 read from the same simulated
pilots (it can only grow with the looks), with enough pilots that the stated interval is tight."""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_lost_batches_table_reads_its_looks_from_the_same_pilots() -> None:
    data = json.loads((DOCS / "gate" / "lost_batches.json").read_text())
    now = {(r["broken_share"], r["batch"], r["looks"]): r for r in data["rows"]}
    for (share, batch, looks), row in now.items():
        if looks == 20:
            ten = now[(share, batch, 10)]
            assert row["now"] >= ten["now"], (
                f"{share:.0%} broken, {batch} a batch: GO by look 20 below look 10"
            )
    assert data["meta"]["replications"] >= 20_000
    fifty = now[(0.03, 50, 10)], now[(0.03, 50, 20)]
    cells = " / ".join(f"{100 * r['now']:.2f}%" for r in fifty)
    uppers = " / ".join(f"{100 * r['now_upper95']:.2f}%" for r in fifty)
    assert f"| 3% | 50 | 10 / 20 | 37.7% / **84.4%** | {cells} ({uppers}) |" in (DOCS / "gate.md").read_text()
