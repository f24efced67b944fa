"""Property tests for the parser of the runner's ``--list`` output (outside input)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from herder.agent.protocol import parse_list_output

CLUSTER = "zzzzz"
OTHER = "yyyyy"

uuid_tail = st.from_regex(r"\A[a-z0-9]{15}\Z")


def uuid_of(cluster: str) -> st.SearchStrategy[str]:
    return uuid_tail.map(lambda tail: f"{cluster}-dz642-{tail}")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text: str) -> None:
    result = parse_list_output(text, CLUSTER)
    for uuid in [*result.running, *result.stale, *result.exited]:
        assert uuid.startswith(CLUSTER)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "",
                "\n",
                " ",
                "\t",
                "stale",
                "exited",
                "broken",
                CLUSTER,
                f"{CLUSTER}-dz642-",
                "-1",
                "0",
                "257",
                "\r",
                "x" * 3,
            ]
        )
    )
)
def test_near_miss_tokens_never_raise(parts: list[str]) -> None:
    parse_list_output("".join(parts), CLUSTER)
    parse_list_output(" ".join(parts), CLUSTER)


line_kinds = st.one_of(
    uuid_of(CLUSTER).map(lambda u: ("running", u, None)),
    uuid_of(CLUSTER).map(lambda u: ("stale", u, None)),
    st.tuples(uuid_of(CLUSTER), st.integers(-(2**31), 2**31)).map(lambda t: ("exited", t[0], t[1])),
    uuid_of(OTHER).map(lambda u: ("other", u, None)),
    st.just(("broken", "", None)),
)


def render(kind: str, uuid: str, code: int | None, pad: str) -> str:
    if kind in ("running", "other"):
        return f"{pad}{uuid}{pad}"
    if kind == "stale":
        return f"{pad}{uuid} stale"
    if kind == "exited":
        return f"{uuid} exited {code}{pad}"
    return "broken"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(line_kinds, st.sampled_from(["", " ", "\t"])), max_size=30),
    st.sampled_from(["\n", "\r\n"]),
)
def test_well_formed_lines_round_trip(
    lines: list[tuple[tuple[str, str, int | None], str]], newline: str
) -> None:
    text = newline.join(render(kind, uuid, code, pad) for (kind, uuid, code), pad in lines)
    result = parse_list_output(text, CLUSTER)
    expect_running = [u for (k, u, _), _ in lines if k == "running"]
    expect_stale = [u for (k, u, _), _ in lines if k == "stale"]
    expect_exited: dict[str, int] = {}
    for (k, u, code), _ in lines:
        if k == "exited":
            assert code is not None
            expect_exited[u] = code
    assert result.running == expect_running
    assert result.stale == expect_stale
    assert result.exited == expect_exited
    assert result.broken == any(k == "broken" for (k, _, _), _ in lines)


@settings(max_examples=200, deadline=None)
@given(st.lists(uuid_of(OTHER), max_size=10), st.lists(uuid_of(CLUSTER), max_size=10))
def test_other_clusters_lines_ignored(others: list[str], ours: list[str]) -> None:
    lines = [
        *(f"{u}" for u in others),
        *(f"{u} stale" for u in others),
        *(f"{u} exited 0" for u in others),
        *ours,
    ]
    result = parse_list_output("\n".join(lines), CLUSTER)
    assert result.running == ours
    assert result.stale == [] and result.exited == {}
