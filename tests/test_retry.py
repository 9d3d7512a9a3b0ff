"""Retry: transient storage errors back off and retry; permanent ones fail at once."""

from __future__ import annotations

import pytest

from pipeline.retry import retry


class Flaky:
    def __init__(self, *errors: BaseException, result: object = "done") -> None:
        self.errors = list(errors)
        self.calls = 0
        self.result = result

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def test_transient_errors_back_off_exponentially(caplog):
    sleeps: list[float] = []
    fn = Flaky(ConnectionResetError("reset"), TimeoutError("slow"), OSError(5, "I/O error"))
    assert retry(fn, what="read s3://b/x.tar", base_delay=1.0, sleep=sleeps.append) == "done"
    assert fn.calls == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        assert 2**attempt * 0.5 <= delay <= 2**attempt  # jittered in [half, full]
    assert caplog.text.count("read s3://b/x.tar") == 3


def test_delay_is_capped():
    sleeps: list[float] = []
    retry(
        Flaky(*[OSError()] * 6),
        attempts=7,
        base_delay=10,
        max_delay=15,
        what="x",
        sleep=sleeps.append,
    )
    assert max(sleeps) <= 15


def test_gives_up_with_the_url_in_the_message():
    sleeps: list[float] = []
    fn = Flaky(*[ConnectionError("refused")] * 5)
    with pytest.raises(ConnectionError) as error:
        retry(fn, attempts=3, what="open s3://b/x.tar", sleep=sleeps.append)
    assert str(error.value) == (
        "open s3://b/x.tar failed after 3 attempts: ConnectionError: refused"
    )
    assert isinstance(error.value.__cause__, ConnectionError)
    assert fn.calls == 3 and len(sleeps) == 2


@pytest.mark.parametrize("kind", [FileNotFoundError, PermissionError, IsADirectoryError])
def test_permanent_errors_are_not_retried(kind):
    fn = Flaky(kind("b/x.tar"))
    with pytest.raises(kind, match=r"open s3://b/x\.tar failed"):
        retry(fn, what="open s3://b/x.tar", sleep=pytest.fail)
    assert fn.calls == 1


def test_code_errors_pass_through_untouched():
    original = TypeError("bug")
    with pytest.raises(TypeError) as error:
        retry(Flaky(original), what="x", sleep=pytest.fail)
    assert error.value is original


def test_unusual_exception_constructor_is_reraised_as_is():
    class Odd(OSError):
        def __init__(self, a, b):
            super().__init__(f"{a}{b}")

    original = Odd("x", "y")
    with pytest.raises(Odd) as error:
        retry(Flaky(original), attempts=1, what="x")
    assert error.value is original


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="attempts"):
        retry(lambda: None, attempts=0, what="x")
    with pytest.raises(ValueError, match="base_delay"):
        retry(lambda: None, base_delay=-1, what="x")
