"""frontend/edge.py builds on waitress's internals (its parser, channel, task and server
classes and their attributes), which waitress may rename in any release.  requirements.txt
pins the minor version tested; this test names every one of them, on real waitress objects,
so that a new waitress fails here, loudly and by name, rather than in production."""
from __future__ import annotations

import importlib.metadata
import socket

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.receiver import ChunkedReceiver
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, Task, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import BadRequest, Error, RequestEntityTooLarge

from frontend import edge

# What edge.py reads, sets or overrides, per waitress object.
PARSER_ATTRIBUTES = ("body_rcv", "completed", "headers_finished", "header_plus", "chunked",
                     "body_bytes_received", "error", "headers", "adj", "received", "parse_header")
CHUNKED_RECEIVER_ATTRIBUTES = ("chunk_remainder",)
CHANNEL_ATTRIBUTES = ("requests", "request", "requests_lock", "close_when_flushed", "will_close",
                      "total_outbufs_len", "connected", "socket", "server", "adj", "task_class",
                      "error_task_class", "parser_class", "received", "service", "handle_write",
                      "handle_read", "handle_close", "readable", "recv")
SERVER_ATTRIBUTES = ("active_channels", "task_dispatcher", "maintenance", "channel_class", "add_task")
TASK_ATTRIBUTES = ("request", "channel", "service", "status", "response_headers", "set_close_on_finish",
                   "content_length", "write")
DISPATCHER_ATTRIBUTES = ("queue_logger", "set_thread_count", "add_task")
ERROR_ATTRIBUTES = ("code", "reason", "body")


def missing(thing, names) -> list[str]:
    return [f"{type(thing).__name__}.{name}" for name in names if not hasattr(thing, name)]


def test_the_pinned_minor_version_is_the_one_installed():
    # A new minor version needs this test and edge.py looked at again before the pin moves.
    assert importlib.metadata.version("waitress").startswith("3.0."), importlib.metadata.version("waitress")


def test_waitress_still_has_every_attribute_edge_relies_on():
    adj = Adjustments(host="127.0.0.1", port=0)
    parser = HTTPRequestParser(adj)
    chunked = ChunkedReceiver(parser.body_rcv)  # a buffer would do: it only holds it
    server = TcpWSGIServer(lambda environ, start: [], adj=adj, _start=False)
    ours, theirs = socket.socketpair()
    try:
        channel = HTTPChannel(server, ours, ("127.0.0.1", 0), adj, map={})
        parser.received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a whole request: the task needs one
        task = WSGITask(channel, parser)
        error_task = ErrorTask(channel, parser)
        dispatcher = ThreadedTaskDispatcher()
        gone = (missing(parser, PARSER_ATTRIBUTES) + missing(chunked, CHUNKED_RECEIVER_ATTRIBUTES)
                + missing(channel, CHANNEL_ATTRIBUTES) + missing(server, SERVER_ATTRIBUTES)
                + missing(task, TASK_ATTRIBUTES) + missing(error_task, TASK_ATTRIBUTES + ("execute",))
                + missing(dispatcher, DISPATCHER_ATTRIBUTES)
                + missing(BadRequest("x"), ERROR_ATTRIBUTES) + missing(RequestEntityTooLarge("x"), ERROR_ATTRIBUTES))
        assert not gone, f"waitress {importlib.metadata.version('waitress')} moved attributes frontend/edge.py uses: {', '.join(gone)}"
        assert issubclass(ErrorTask, Task)
        assert parser.headers_finished and parser.completed
    finally:
        ours.close()
        theirs.close()
        server.close()


def test_edge_overrides_methods_waitress_still_calls():
    # An override of a method waitress no longer has would silently never run.
    overridden = [(edge.EdgeParser, HTTPRequestParser), (edge.EdgeTask, WSGITask), (edge.EdgeErrorTask, ErrorTask),
                  (edge.EdgeChannel, HTTPChannel), (edge.EdgeServer, TcpWSGIServer)]
    orphans = [f"{ours.__name__}.{name} (no {base.__name__}.{name})" for ours, base in overridden
               for name, value in vars(ours).items()
               if callable(value) and not name.startswith("__") and name not in ALLOWED_NEW_METHODS
               and not hasattr(base, name)]
    assert not orphans, "edge.py overrides what waitress no longer has: " + ", ".join(orphans)


# Methods edge.py adds of its own (not overrides); waitress never calls them.
ALLOWED_NEW_METHODS = {"_bare_lf_in_head", "_refuse", "read_overdue", "answer_timeout", "start_lingering",
                       "release", "task_class", "parser_class", "error_task_class", "channel_class"}


def test_waitress_errors_keep_their_plain_text_outside_our_channels():
    # Our JSON rendering lives in our channel's error task, not in waitress's Error class.
    status, headers, body = BadRequest("no").to_response()
    assert status == "400 Bad Request" and ("Content-Type", "text/plain; charset=utf-8") in headers
    assert Error.to_response.__module__ == "waitress.utilities"
    status, headers, body = edge.json_error_response(RequestEntityTooLarge("big"), 1000)
    assert status.startswith("413") and b'"payload_too_large"' in body and b"1000 bytes" in body
