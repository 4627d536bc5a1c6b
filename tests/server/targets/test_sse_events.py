"""Splitting an upstream's SSE bytes into data payloads (server.sse.EventSplitter), as the provider stream reads
them: whatever each network read brings."""

from __future__ import annotations

from server.sse import EventSplitter


def test_events_that_arrive_in_one_read_come_out_together() -> None:
    assert EventSplitter().feed(b"data: a\n\ndata: b\n\ndata: [DONE]\n\n") == [b"a", b"b", b"[DONE]"]


def test_an_event_cut_across_reads_comes_out_once_it_is_complete() -> None:
    events = EventSplitter()
    assert events.feed(b'data: a\n\ndata: {"par') == [b"a"]
    assert events.feed(b't": 1}\n') == []
    assert events.feed(b"\n") == [b'{"part": 1}']


def test_comments_and_other_fields_are_skipped() -> None:
    fed = EventSplitter().feed(b": keep-alive\n\nevent: message\nid: 7\ndata: a\n\nretry: 100\n\ndata: b\n\n")
    assert fed == [b"a", b"b"]


def test_a_multi_line_data_field_is_joined_with_newlines() -> None:
    assert EventSplitter().feed(b"data: first\ndata:second\n\ndata: c\n\n") == [b"first\nsecond", b"c"]


def test_crlf_line_endings_split_like_lf_even_when_cut_between_cr_and_lf() -> None:
    events = EventSplitter()
    assert events.feed(b"data: a\r\n\r\ndata: b\r") == [b"a"]
    assert events.feed(b"\n\r\n") == [b"b"]


def test_a_last_event_without_its_blank_line_is_what_the_end_completes() -> None:
    events = EventSplitter()
    assert events.feed(b"data: a\n\ndata: b") == [b"a"]
    assert events.end() == [b"b"]


def test_the_end_of_a_stream_with_nothing_pending_completes_nothing() -> None:
    events = EventSplitter()
    events.feed(b"data: a\n\n")
    assert events.end() == []
