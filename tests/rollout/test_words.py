from rollout.words import counted


def test_counted_says_one_and_many_in_english() -> None:
    assert counted(1, "pilot") == "1 pilot"
    assert counted(0, "pilot") == "0 pilots"
    assert counted(1200, "request") == "1,200 requests"
    assert counted(2, "use case") == "2 use cases"
    assert counted(3, "analysis", "analyses") == "3 analyses"
