"""The evaluate flow's closing line says the money as the ROI's verdict does (rollout.roi.usd)."""

from __future__ import annotations

from flows.evaluate import summary_line


def _summary(saved: float) -> dict:
    return {
        "speedup": 0.43,
        "speedup_low": 0.11,
        "speedup_high": 1.67,
        "device": "cpu",
        "savings_month_usd": saved,
        "measured_under_overload": None,
    }


def test_a_loss_is_never_called_saved() -> None:
    """Review V finding 7: a loss read "$-132/month saved"."""
    line = summary_line("tiny-chat", _summary(-132.02))
    assert line == "tiny-chat: speed-up 0.43x [0.11, 1.67] on cpu, $132/month more"
    assert summary_line("tiny-chat", _summary(1606.4)).endswith(", $1,606/month saved")
    assert summary_line("tiny-chat", _summary(0.0)).endswith(", $0/month saved")
