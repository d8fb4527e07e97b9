"""Which status a sync builds on: the index's copy, or our last status patch that the index has not seen."""

from __future__ import annotations

import pytest

from controllers.kube import compare_versions
from controllers.statuswriter import Sent, unseen


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ("9", "10", -1),  # by value, not as strings ("9" > "10" as text)
        ("10", "9", 1),
        ("1234", "1234", 0),
        ("010", "10", None),  # leading zero: not a comparable version
        ("0", "1", None),  # zero is never a live version
        ("a1", "10", None),
        (None, "10", None),
        ("10", "", None),
    ],
)
def test_resource_versions_compare_as_kubernetes_defines(
    a: str | None, b: str | None, want: int | None
) -> None:
    assert compare_versions(a, b) == want


def test_a_copy_from_between_two_of_our_patches_is_not_current() -> None:
    """Two syncs patch status before the index catches up: derived from the copy at 100, our patches made 101
    (nodesTarget 3) and then 102 (4). The index's copy at 101 carries the first: a sync must build on the
    second, or it puts the Job back at 3 nodes."""
    sent = Sent(before="100", after="102", status={"nodesTarget": 4})
    assert unseen("100", sent)
    assert unseen("101", sent)  # the first patch seen, not the second
    assert not unseen("102", sent)
    assert not unseen("107", sent)  # written after our patch: the index's copy is current


def test_versions_that_do_not_compare_fall_back_to_the_one_the_status_was_derived_from() -> None:
    sent = Sent(before="x-1", after="x-2", status={})
    assert unseen("x-1", sent)
    assert not unseen("x-2", sent)
    assert not unseen("x-9", sent)
