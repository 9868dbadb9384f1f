"""The only module that imports rich: tables, the live join panel, JSON lines and plain lines.

rich is imported only where something is drawn on a terminal: piped and JSON output never load it
(it costs about 40 ms of start-up).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from llmroom_cli.relay import Traffic
    from llmroom_cli.session import Status


def silence_stdout() -> None:
    """After the reader of stdout went away: later writes (and the interpreter's final flush) go to
    /dev/null instead of raising BrokenPipeError again."""
    silence_fd(1)


def silence_fd(fd: int) -> None:
    """Point `fd` at /dev/null: a lost terminal (EIO), a gone reader (EPIPE) or a full disk (ENOSPC)
    stops mattering. What was buffered for it is dropped, not retried."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and stream.fileno() == fd:
                # Drop what the failed write left in the buffer, so the final flush does not fail too.
                stream.flush()
        except (OSError, ValueError):
            pass


# What foreign text (nicknames, model and room names, mDNS names, error messages from a hub) must
# never carry to a terminal: C0 and C1 controls (ESC starts every ANSI/OSC sequence), DEL, the bidi
# overrides that reorder what is shown, and lone surrogates (which cannot even be encoded).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _shown(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """Foreign text made safe to show, literally: control characters become visible escapes (ESC is
    shown as the four characters `\\x1b`), lone surrogates become U+FFFD. Rich markup is not
    interpreted anywhere it is drawn (cells are `Text`, prints use markup=False), so `[/red]` is shown
    as typed. Every command that shows foreign text goes through here."""
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(_shown, text)


def _console(file: IO[str] | None = None) -> Console:
    from rich.console import Console

    return Console(file=file or sys.stdout, highlight=False, soft_wrap=False)


def ago(ms: int | float | None, now_ms: float | None = None) -> str:
    """1709409600000 -> '4s ago' / '3m ago' / '2h ago' / '5d ago'."""
    if not isinstance(ms, (int, float)) or isinstance(ms, bool):
        return "-"
    now = time.time() * 1000 if now_ms is None else now_ms
    secs = max(0, int((now - ms) / 1000))
    if secs < 60:
        return f"{secs}s ago"
    if secs < 3600:
        return f"{secs // 60}m ago"
    if secs < 86400:
        return f"{secs // 3600}h ago"
    return f"{secs // 86400}d ago"


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


ROOM_COLUMNS = ("CODE", "NAME", "PARTICIPANTS", "AGE", "PASSWORD")
PARTICIPANT_COLUMNS = (
    "ID",
    "NICKNAME",
    "MODEL",
    "STATUS",
    "GPU",
    "VRAM",
    "RAM",
    "ENDPOINT",
    "LAST SEEN",
    "SPEED",  # last: piped column positions stay what they were before `join --bench`
)
# A shortened id on a terminal: this many characters at least, more where two ids share them.
SHORT_ID_CHARS = 8


def iso_utc(ms: Any) -> str:
    """1709409600000 -> '2024-03-02T20:00:00Z' (what a script wants); '-' for anything but a number."""
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms):
        return "-"
    try:
        stamp = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "-"
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _protected(room: dict[str, Any]) -> str:
    value = room.get("passwordProtected")
    return {True: "yes", False: "no"}.get(value, "-") if isinstance(value, bool) else "-"


def room_rows(
    rooms: Sequence[dict[str, Any]], now_ms: float | None = None, plain: bool = False
) -> list[list[str]]:
    """Rows of ROOM_COLUMNS. `plain` (piped): the creation time in ISO-8601 UTC instead of an age.
    PASSWORD is yes/no where the hub says (v0.6), '-' where it does not (v0.1)."""
    return [
        [
            _text(r.get("code")),
            _text(r.get("name")),
            _text(r.get("participantCount", 0)),
            iso_utc(r.get("createdAt")) if plain else ago(r.get("createdAt"), now_ms),
            _protected(r),
        ]
        for r in rooms
    ]


def _gb(value: Any, plain: bool = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return str(value) if plain else f"{value} GB"


def short_ids(ids: Sequence[str], min_chars: int = SHORT_ID_CHARS) -> list[str]:
    """Each id cut to the shortest prefix (at least `min_chars`) that no other id of the list shares,
    as git shortens hashes: what is shown can always be typed back to `leave`. O(n log n): only an id's
    neighbours in sorted order can share its longest prefix (a room may list 10,000 participants)."""

    def common(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n

    order = sorted(range(len(ids)), key=lambda k: ids[k])
    need = dict.fromkeys(range(len(ids)), min_chars)
    for a, b in zip(order, order[1:], strict=False):
        shared = common(ids[a], ids[b]) + 1
        need[a], need[b] = max(need[a], shared), max(need[b], shared)
    return [full if need[i] >= len(full) else full[: need[i]] + "…" for i, full in enumerate(ids)]


def _status(p: dict[str, Any]) -> str:
    """The status, and for a v0.6 participant (`connection.kind` "tunnel") whether its tunnel is up."""
    status = _text(p.get("status"))
    conn = p.get("connection")
    if isinstance(conn, dict) and conn.get("kind") == "tunnel" and isinstance(conn.get("connected"), bool):
        return f"{status}, tunnel {'up' if conn['connected'] else 'down'}"
    return status


def participant_rows(
    parts: Sequence[dict[str, Any]], now_ms: float | None = None, plain: bool = False, wide: bool = False
) -> list[list[str]]:
    """Rows of PARTICIPANT_COLUMNS. `plain` (piped): whole ids, plain numbers (VRAM, RAM in GB) and
    ISO-8601 UTC times; on a terminal ids are shortened unless `wide`."""
    ids = [_text(p.get("id")) for p in parts]
    shown_ids = ids if plain or wide else short_ids(ids)
    rows = []
    for p, pid in zip(parts, shown_ids, strict=True):
        specs = p.get("specs") if isinstance(p.get("specs"), dict) else {}
        assert isinstance(specs, dict)
        rows.append(
            [
                pid,
                _text(p.get("nickname")),
                _text(p.get("model")),
                _status(p),
                _text(specs.get("gpu")),
                _gb(specs.get("vram"), plain),
                _gb(specs.get("ram"), plain),
                _text(p.get("endpoint")),
                iso_utc(p.get("lastSeen")) if plain else ago(p.get("lastSeen"), now_ms),
                _speed(specs.get("llm"), plain),
            ]
        )
    return rows


def _speed(llm: Any, plain: bool) -> str:
    """`join --bench`'s figures from specs.llm: "81 ms, 42.5 tok/s" on a terminal; piped, the tokens
    per second as a plain number; "-" without figures."""
    from llmroom_cli.bench import describe

    if plain:
        tps = llm.get("tokensPerSecond") if isinstance(llm, dict) else None
        ok = isinstance(tps, (int, float)) and not isinstance(tps, bool) and math.isfinite(tps) and tps > 0
        return f"{tps:g}" if ok else "-"
    return describe(llm) or "-"


# When a terminal is too narrow for a table, columns are dropped in this order (lowest first; ties:
# the rightmost first); unlisted columns are never dropped. What is kept is cut with an ellipsis, never
# split inside a word, except the free-text columns of WRAPPED, which wrap at spaces.
DROP_ORDER: dict[str, int] = {
    "SPEED": 1,
    "RAM": 1,
    "GPU": 2,
    "PASSWORD": 2,
    "ADDRESSES": 2,
    "VERSION": 3,
    "VRAM": 3,
    "ROUND TRIP": 3,
    "AGE": 4,
    "LAST SEEN": 4,
    "ENDPOINT": 5,
    "PARTICIPANTS": 6,
    "SOURCE": 6,
    "HUB API": 6,
    "MODEL": 7,
    "STATUS": 8,
}
WRAPPED = frozenset({"DETAIL", "VALUE", "LAST ERROR"})
GAP = 2  # rich's padding between columns (box=None, pad_edge=False)


def fit_columns(columns: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[int]:
    """The indexes of the columns to show in `width` characters: all when they fit at their natural
    width, else without the lowest of DROP_ORDER, one at a time, until they fit or none is left to drop."""
    natural = [len(c) for c in columns]
    for row in rows:
        for i, cell in enumerate(row[: len(columns)]):
            natural[i] = max(natural[i], len(visible(cell)))
    kept = list(range(len(columns)))

    def need(idx: list[int]) -> int:
        # A wrapped column needs only its longest word; the others their whole text.
        return sum(min(natural[i], 24) if columns[i] in WRAPPED else natural[i] for i in idx) + GAP * (
            len(idx) - 1
        )

    droppable = sorted(
        (i for i, c in enumerate(columns) if c in DROP_ORDER), key=lambda i: (DROP_ORDER[columns[i]], -i)
    )
    for i in droppable:
        if need(kept) <= width:
            break
        kept.remove(i)
    return kept


def build_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    dim: Sequence[bool] = (),
    styles: Sequence[str | None] = (),
    width: int | None = None,
) -> Table:
    """A rich table of text cells; row i dimmed where `dim[i]`, or drawn in `styles[i]` (a problem in
    bold red: it must be the loudest thing on screen, not the faintest). With `width`, columns that do
    not fit are dropped by priority (fit_columns) and a caption says how many."""
    from rich.table import Table
    from rich.text import Text

    kept = fit_columns(columns, rows, width) if width is not None else list(range(len(columns)))
    hidden = len(columns) - len(kept)
    caption = f"{hidden} column{'s' if hidden > 1 else ''} hidden (--json)" if hidden else None
    table = Table(
        box=None,
        header_style="bold",
        pad_edge=False,
        caption=caption,
        caption_style="dim",
        caption_justify="left",
    )
    for i in kept:
        col = columns[i]
        if col in WRAPPED:
            table.add_column(col, overflow="fold", min_width=len(col), ratio=1)
        else:
            # A header is never cut; a cell is cut with an ellipsis rather than split across lines.
            table.add_column(col, no_wrap=True, overflow="ellipsis", min_width=len(col))
    for r, row in enumerate(rows):
        # Text cells: rich markup in a nickname (`[/]x`, `[red]`) is shown, never interpreted.
        cells = [Text(visible(row[i]) if i < len(row) else "") for i in kept]
        style = styles[r] if r < len(styles) and styles[r] else None
        table.add_row(*cells, style=style or ("dim" if r < len(dim) and dim[r] else None))
    return table


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    dim: Sequence[bool] = (),
    empty: str = "",
    file: IO[str] | None = None,
    styles: Sequence[str | None] = (),
) -> None:
    """A rich table on a terminal; tab-separated lines without a header when piped (for scripts).
    rich leaves out colour under NO_COLOR and TERM=dumb."""
    out = file or sys.stdout
    if not out.isatty():
        for row in rows:
            out.write("\t".join(visible(cell) for cell in row) + "\n")
        out.flush()
        return
    if len(rows) > RICH_MAX_ROWS:
        _print_aligned(columns, [[visible(cell) for cell in row] for row in rows], dim, out)
        return
    console = _console(out)
    if not rows:
        if empty:
            console.print(visible(empty), style="dim", markup=False)
        return
    console.print(build_table(columns, rows, dim, styles, width=console.width))


# rich measures every cell of every row: 10,000 participants take about 14 s to draw. Past this many
# rows a terminal gets plain padded columns instead (0.1 s), dimmed with ANSI unless NO_COLOR is set.
RICH_MAX_ROWS = 500


def _print_aligned(
    columns: Sequence[str], rows: Sequence[Sequence[str]], dim: Sequence[bool], out: IO[str]
) -> None:
    import os

    widths = [len(c) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            if len(cell) > widths[i]:
                widths[i] = len(cell)
    colour = not os.environ.get("NO_COLOR")

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(cells)).rstrip()

    parts = [("\x1b[1m" + line(columns) + "\x1b[0m") if colour else line(columns)]
    for i, row in enumerate(rows):
        text = line(row)
        parts.append(f"\x1b[2m{text}\x1b[0m" if colour and i < len(dim) and dim[i] else text)
    out.write("\n".join(parts) + "\n")
    out.flush()


def rooms_view(rooms: Sequence[dict[str, Any]], plain: bool = False) -> tuple[list[list[str]], list[bool]]:
    """Rows and dim flags for `list` (see room_rows)."""
    return room_rows(rooms, plain=plain), [False] * len(rooms)


def participants_view(
    parts: Sequence[dict[str, Any]], plain: bool = False, wide: bool = False
) -> tuple[list[list[str]], list[bool]]:
    """Rows and dim flags (offline participants) for `list CODE` (see participant_rows)."""
    return participant_rows(parts, plain=plain, wide=wide), [p.get("status") != "online" for p in parts]


def live_capable(stream: IO[str] | None = None) -> bool:
    """True when `stream` (stdout by default) is a terminal that can redraw a live display in place.

    `TERM=dumb` (Emacs' shell, some CI consoles) or `unknown` cannot: rich would hold every frame back
    until the end, so a join showed nothing until Ctrl-C. Those get plain lines instead."""
    import os

    out = stream or sys.stdout
    try:
        if not out.isatty():
            return False
    except (ValueError, OSError):
        return False
    return os.environ.get("TERM", "").strip().lower() not in ("dumb", "unknown")


class Watcher:
    """`list --watch`: a live table on a terminal, repeated plain output when piped (or on a terminal
    that cannot redraw in place)."""

    def __init__(self, columns: Sequence[str], title: str) -> None:
        self.columns = columns
        self.title = title
        self.live: Live | None = None
        # Set when the terminal or the reader went away (EIO, EPIPE): the caller stops watching.
        self.broken = False
        # A warning shown under the table until the next successful refresh (it then is stale).
        self._warning = ""
        self._last: tuple[list[list[str]], list[bool], str] | None = None
        self._size: tuple[int, int] | None = None
        if live_capable(sys.stdout):
            from rich.live import Live

            self.live = Live(console=_console(), auto_refresh=False, transient=False)
            self.live.start()

    def show(self, rows: list[list[str]], dim: list[bool], note: str = "") -> None:
        """Draw fresh rows. A warning given by `warn` since the last refresh is dropped: the refresh
        worked, so the trouble it described is over."""
        if self.broken:
            return
        self._warning = ""
        self._last = (rows, dim, note)
        try:
            self._show(rows, dim, note)
        except OSError:
            self._gone()

    def warn(self, text: str) -> None:
        """A transient problem (the hub did not answer this refresh): on a terminal it is shown under
        the table until the next `show`; piped, it is one line on stderr."""
        if self.broken:
            return
        try:
            if self.live is None:
                sys.stderr.write(visible(text) + "\n")
                sys.stderr.flush()
                return
            self._warning = text
            if self._last is not None:
                self._show(*self._last)
        except OSError:
            self._gone()

    def _gone(self) -> None:
        self.broken = True
        silence_fd(1)
        silence_fd(2)

    def _show(self, rows: list[list[str]], dim: list[bool], note: str) -> None:
        if self.live is not None:
            stamp = time.strftime("%H:%M:%S")
            from rich.console import Group
            from rich.text import Text

            caption = Text(
                visible(f"{self.title} · {stamp}{' · ' + note if note else ''} · Ctrl-C to stop"), style="dim"
            )
            parts: list[Any] = [build_table(self.columns, rows, dim, width=self.live.console.width), caption]
            if self._warning:
                parts.append(Text(visible(self._warning), style="yellow"))
            size = _terminal_size()
            if size != self._size:
                if self._size is not None:  # resized: see JoinOutput._draw
                    from rich.control import Control

                    self.live.console.control(Control.home(), Control.clear())
                self._size = size
            self.live.update(Group(*parts), refresh=True)
            return
        for row in rows:
            sys.stdout.write("\t".join(visible(cell) for cell in row) + "\n")
        sys.stdout.write("\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self.live is not None:
            try:
                self.live.stop()
            except OSError:
                self._gone()


def print_rows_table(rows: Sequence[tuple[str, str, str]], columns: Sequence[str]) -> None:
    print_table(columns, [list(r) for r in rows])


# -- join output ---------------------------------------------------------------------------------


def _fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt_ms(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _fmt_rate(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "- tokens/s"
    return f"{value:.1f} tokens/s"


# The panel's key column, and the value widths it reserves for lines that change while it runs
# (so the frame never grows or shrinks with a counter, a round trip or an error message).
_PANEL_KEYS = (
    "room",
    "hub",
    "nickname",
    "model",
    "endpoint",
    "id",
    "status",
    "last heartbeat",
    "uptime",
    "beats",
    "reconnects",
    "requests",
    "last request",
)
_KEY_W = max(len(k) for k in _PANEL_KEYS)
_RESERVED_VALUE_W = len("9999 served · 99 in flight · 9999 failed")
# Border and padding of rich's Panel (1 + 1 each side) plus the grid's gap between the two columns.
_FRAME_W = 4 + 2
# A status message longer than this many lines of the value column is cut with an ellipsis.
_MESSAGE_LINES = 3
# ... but never fewer characters than this: on a narrow terminal the end of a message (the cause:
# "nothing listens on ...") matters more than a short frame.
_MESSAGE_MIN = 120
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
# A finished request redraws the panel at once unless one was drawn this recently: a relay serving
# hundreds of requests a second must not spend its CPU on frames nobody can read.
_REQUEST_REDRAW_S = 0.2


class _EchoOff:
    """Typed keys are not echoed while a live display runs (they would tear the frame). Only ECHO is
    turned off: Ctrl-C still signals. Restored by `restore()`, which every way out of the live display
    calls, and at interpreter exit as a last resort; keys typed meanwhile are discarded then, so they
    do not run as a command in the shell afterwards."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.saved: list[Any] | None = None

    def start(self) -> None:
        import atexit
        import termios

        try:
            fd = sys.stdin.fileno()
            if not sys.stdin.isatty():
                return
            import os

            if os.tcgetpgrp(fd) != os.getpgrp():
                # A background job (`llmroom join CODE &`): changing the terminal would stop us
                # (SIGTTOU), and the keys typed belong to the shell in the foreground anyway.
                return
            saved = termios.tcgetattr(fd)
            quiet = list(saved)
            quiet[3] &= ~(termios.ECHO | termios.ECHONL)
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except (termios.error, OSError, ValueError, AttributeError):
            return  # no usable terminal on stdin: nothing to hide, nothing to restore
        self.fd, self.saved = fd, saved
        atexit.register(self.restore)

    def restore(self) -> None:
        import termios

        fd, saved = self.fd, self.saved
        self.fd = self.saved = None
        if fd is None or saved is None:
            return
        try:
            termios.tcflush(fd, termios.TCIFLUSH)
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except (termios.error, OSError, ValueError):
            pass  # the terminal is gone (hang-up): nobody is left to type on it


class JoinOutput:
    """Renders session events: JSON lines, plain state lines, a live panel, or nothing (quiet).

    `mode` "live" on a terminal that cannot redraw in place (TERM=dumb) becomes "plain". `traffic`,
    when given, is called for a snapshot of the relay's counters (`relay.Traffic`) each time the panel
    is drawn."""

    def __init__(
        self,
        mode: str,
        info: dict[str, str],
        clock: Callable[[], float] = time.monotonic,
        *,
        traffic: Callable[[], Traffic] | None = None,
    ) -> None:
        if mode == "live" and not live_capable(sys.stdout):
            mode = "plain"
        self.mode = mode  # "json" | "plain" | "live" | "quiet"
        self.info = info
        self.clock = clock
        self.traffic = traffic
        self.status: Status | None = None
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._stop_refresh = threading.Event()
        self._tick = threading.Event()  # wakes the refresher at once (a resized window)
        self._refresher: threading.Thread | None = None
        self._size: tuple[int, int] | None = None
        self._echo = _EchoOff()
        self._winch_previous: Any = None
        self._winch_installed = False
        # The start-up retry against a hub that is down: (what failed, monotonic deadline, next try).
        self._retry: tuple[str, float, float | None] | None = None
        self._paused: str | None = None
        self._drawn_at = 0.0  # monotonic time of the last frame
        self._dirty = False  # something changed since then that the refresher should draw
        # Called once if whoever reads our stdout goes away (`join --json | head -1`): the CLI then
        # leaves and exits as on a signal, instead of heartbeating for nobody.
        self.on_broken: Callable[[], None] | None = None
        self.broken = False
        if self.mode == "live":
            self._watch_resizes()

    # The session calls this from its worker thread.
    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                self._render(event)
            except OSError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        """Whoever reads us is gone: the pipe's reader (EPIPE) or the terminal itself (EIO after a
        hang-up). Not an error: stop drawing, and let the CLI leave the room and exit 0."""
        if self.broken:
            return
        self.broken = True
        silence_fd(1)
        if self.mode == "live":
            silence_fd(2)  # the panel's terminal is stderr's too
        if self.on_broken is not None:
            self.on_broken()

    def _render(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "paused":
            self._paused = str(event.get("reason") or event.get("cause") or "paused")
        elif name in ("resumed", "left"):
            self._paused = None
        if self.mode == "json":
            sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        elif self.mode == "plain":
            line = self._plain(event)
            if line:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        elif self.mode == "live":
            if name == "retrying":
                self._retrying(str(event.get("reason", "")), event.get("remaining_s"), event.get("next_s"))
            elif name == "joined":
                self._retry = None
                if self._live is None:
                    self._start_live()
                else:
                    self._draw()
            elif name == "left":
                self._stop_live()
                line = self._plain(event)
                if line:
                    _console(sys.stderr).print(line, highlight=False, markup=False)
            elif name == "request" and time.monotonic() - self._drawn_at < _REQUEST_REDRAW_S:
                self._dirty = True  # a busy relay: the refresher draws the latest counts shortly
            elif self._live is not None:
                self._draw()

    def _plain(self, event: dict[str, Any]) -> str | None:
        line = self._plain_raw(event)
        return visible(line) if line is not None else None

    def _plain_raw(self, event: dict[str, Any]) -> str | None:
        name = event["event"]
        if name == "joined":
            return (
                f"joined room {event['room']} on {event['hub']} as {event['nickname']} "
                f"sharing {event['model']} from {event['endpoint']} (id {event['id']}); the room's"
                f" OpenAI-compatible API: {room_url(str(event['hub']), str(event['room']))}"
            )
        if name == "reconnecting":
            if event.get("attempt") == 1:
                return f"reconnecting: {event.get('reason')}"
            return None
        if name == "online":
            return "back online"
        if name == "rejoined":
            return "the hub had forgotten us: rejoined"
        if name == "paused":
            return f"paused: {event.get('reason') or event.get('cause') or 'no reason given'}"
        if name == "resumed":
            return "resumed: sharing again"
        if name == "request":
            return _request_line(event)
        if name == "left":
            # An unconfirmed leave is one warning on stderr (with the cleanup command), from the CLI.
            return "left the room" if event.get("confirmed") else None
        return None

    # -- the start-up retry ---------------------------------------------------------------------------

    def retrying(self, reason: str, remaining_s: float, next_s: float | None = None) -> bool:
        """Start-up retries a hub that does not answer: on a terminal that can redraw, a live line with
        a spinner says what failed and counts the seconds left (True: the caller prints nothing); in
        the other modes nothing is drawn here (False: the caller says it its own way)."""
        with self._lock:
            if self.mode != "live" or self.broken:
                return False
            try:
                self._retrying(reason, remaining_s, next_s)
            except OSError:
                self._reader_gone()
            return True

    def _retrying(self, reason: str, remaining_s: Any, next_s: Any) -> None:
        now = self.clock()
        left = float(remaining_s) if isinstance(remaining_s, (int, float)) else 0.0
        nxt = now + float(next_s) if isinstance(next_s, (int, float)) else None
        self._retry = (reason, now + left, nxt)
        if self._live is None:
            self._start_live()
        else:
            self._draw()

    def _retry_line(self) -> Any:
        """Two lines: what failed (cut to the width, never wrapped), then the countdown."""
        from rich.console import Group
        from rich.text import Text

        assert self._retry is not None
        reason, deadline, nxt = self._retry
        now = self.clock()
        frame = _SPINNER[int(now * 10) % len(_SPINNER)]
        what = Text(f"{frame} ", style="yellow", no_wrap=True, overflow="ellipsis")
        what.append(visible(reason))
        when = f"next try in {max(0.0, nxt - now):.0f} s, " if nxt is not None and nxt > now else ""
        left = max(0.0, deadline - now)
        countdown = Text(
            f"  retrying: {when}{left:.0f} s left · Ctrl-C to stop",
            style="dim",
            no_wrap=True,
            overflow="ellipsis",
        )
        return Group(what, countdown)

    # -- the live panel ---------------------------------------------------------------------------

    def _renderable(self) -> Any:
        return self._retry_line() if self._retry is not None else self._panel()

    def _start_live(self) -> None:
        from rich.live import Live

        console = _console()
        self._size = _terminal_size()
        self._echo.start()
        self._live = Live(self._renderable(), console=console, auto_refresh=False, transient=False)
        # refresh=True: drawn now, not at the refresher's first tick (the panel appeared 1 s late).
        self._live.start(refresh=True)
        # Each live display has its own stop flag: one ended by end_retry() never stops the next.
        self._stop_refresh = threading.Event()
        self._refresher = threading.Thread(
            target=self._refresh_loop, args=(self._stop_refresh,), name="llmroom-panel", daemon=True
        )
        self._refresher.start()

    def _draw(self) -> None:
        """Redraw in place; after the window was resized, clear the screen first: a terminal that
        re-wraps the old frame (tmux, VTE, iTerm2) would leave its top half behind otherwise."""
        live = self._live
        if live is None:
            return
        size = _terminal_size()
        if size != self._size:
            self._size = size
            from rich.control import Control

            live.console.control(Control.home(), Control.clear())
        live.update(self._renderable(), refresh=True)
        self._drawn_at = time.monotonic()
        self._dirty = False

    def _refresh_loop(self, stop: threading.Event) -> None:
        last = 0.0
        while not stop.is_set():
            # Ten frames a second for the spinner; otherwise a look at the window size four times a
            # second (a resize is also signalled) and a new frame each second for the clocks.
            self._tick.wait(0.1 if self._retry is not None else 0.25)
            self._tick.clear()
            if stop.is_set():
                return
            with self._lock:
                if self._live is None or self.broken:
                    continue
                now = time.monotonic()
                quiet = not self._dirty and _terminal_size() == self._size
                if self._retry is None and now - last < 1.0 and quiet:
                    continue
                last = now
                try:
                    self._draw()
                except OSError:
                    self._reader_gone()

    def _watch_resizes(self) -> None:
        """SIGWINCH wakes the refresher at once (only the main thread may set a handler; elsewhere the
        refresher's size check still catches the resize within a quarter of a second)."""
        import signal

        if not hasattr(signal, "SIGWINCH") or threading.current_thread() is not threading.main_thread():
            return
        tick = self._tick

        def on_resize(signum: int, frame: Any) -> None:
            tick.set()

        try:
            self._winch_previous = signal.signal(signal.SIGWINCH, on_resize)
            self._winch_installed = True
        except (ValueError, OSError):
            pass

    def _unwatch_resizes(self) -> None:
        import signal

        if not self._winch_installed or threading.current_thread() is not threading.main_thread():
            return
        self._winch_installed = False
        try:
            signal.signal(signal.SIGWINCH, self._winch_previous or signal.SIG_DFL)
        except (ValueError, OSError, TypeError):
            pass

    def _stop_live(self) -> None:
        self._stop_refresh.set()
        self._tick.set()
        live, self._live = self._live, None
        try:
            if live is not None:
                if self._retry is not None:
                    live.transient = True  # a retry that ended (error or Ctrl-C) leaves no spinner behind
                elif not self.broken:
                    self._live = live  # the final frame, drawn as any other (cleared after a resize)
                    self._draw()
                    self._live = None
                live.stop()
        except OSError:
            self._reader_gone()
        finally:
            self._echo.restore()

    def end_retry(self) -> None:
        """The start-up retry is over without a join (the hub answered, but the room wants a password):
        the spinner line goes, and echo comes back, before anything is asked on the terminal."""
        with self._lock:
            if self._retry is not None and self._live is not None:
                self._stop_live()
            self._retry = None

    def close(self) -> None:
        with self._lock:
            self._stop_live()
            self._unwatch_resizes()

    def note(self, text: str, table: tuple[Sequence[str], list[list[str]], list[bool]] | None = None) -> None:
        """A message (and optionally a table) shown above the live panel, or as plain lines."""
        with self._lock:
            if self.mode == "quiet" or self.broken:
                return
            try:
                self._note(text, table)
            except OSError:
                self._reader_gone()

    def _note(self, text: str, table: tuple[Sequence[str], list[list[str]], list[bool]] | None) -> None:
        text = visible(text)
        if self.mode == "live" and self._live is not None:
            # A command to copy is never broken by rich (the terminal folds it; a copy is whole).
            copyable = text.lstrip().startswith("curl ")
            self._live.console.print(text, highlight=False, markup=False, soft_wrap=copyable)
            if table is not None:
                self._live.console.print(build_table(*table))
            return
        out = sys.stderr if self.mode == "json" else sys.stdout
        out.write(text + "\n")
        if table is not None:
            for row in table[1]:
                out.write("\t".join(visible(cell) for cell in row) + "\n")
        out.flush()

    def panel_width(self, columns: int) -> int:
        """The panel's width on a terminal `columns` wide: set by what stays put (the share's names
        and URLs, the widest counters), never by a status message, which wraps inside instead."""
        values = [len(visible(str(self.info.get(k, "-")))) for k in ("room", "hub", "nickname", "model")]
        values += [len(visible(str(self.info.get(k, "-")))) for k in ("endpoint", "id")]
        if self.info.get("hub") and self.info.get("room"):
            values.append(len(visible(room_url(self.info["hub"], self.info["room"]))))
        natural = _FRAME_W + _KEY_W + max([_RESERVED_VALUE_W, *values])
        return max(1, min(columns, natural))

    def _panel(self) -> Panel:
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        st = self.status
        width = self.panel_width(_console_width(self._live))
        value_w = max(8, width - _FRAME_W - _KEY_W)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True, min_width=_KEY_W)
        grid.add_column(overflow="fold")
        for key in ("room", "hub", "nickname", "model", "endpoint", "id"):
            grid.add_row(key, Text(visible(str(self.info.get(key, "-")))))
        if self.info.get("hub") and self.info.get("room"):
            # Where a person sends requests to the room (any OpenAI client's base URL).
            grid.add_row("room API", Text(visible(room_url(self.info["hub"], self.info["room"]))))
        if st is not None:
            paused = self._paused is not None or st.state == "paused"
            shown = "paused" if paused else st.state
            colour = {
                "online": "green",
                "reconnecting": "yellow",
                "paused": "magenta",
                "leaving": "blue",
                "left": "blue",
            }.get(shown, "white")
            state = Text(shown, style=f"bold {colour}")
            message = None
            if paused:
                message = self._paused
            elif st.state == "reconnecting" and st.last_error:
                message = st.last_error
            if message:
                room = max(value_w * _MESSAGE_LINES, _MESSAGE_MIN) - len(shown)
                state.append("  " + _clip(visible(message), room))
                state.stylize(colour, len(shown))
            grid.add_row("status", state)
            now = self.clock()
            if st.last_beat_at is not None:
                rtt = f"{st.last_rtt_ms:.1f} ms" if st.last_rtt_ms is not None else "-"
                grid.add_row("last heartbeat", f"{now - st.last_beat_at:.0f}s ago · round trip {rtt}")
            else:
                grid.add_row("last heartbeat", "-")
            if st.joined_at is not None:
                grid.add_row("uptime", _fmt_uptime(now - st.joined_at))
            grid.add_row("beats", str(st.beats))
            grid.add_row("reconnects", str(st.reconnects))
        if self.traffic is not None:
            grid.add_row("requests", self._requests_line())
            grid.add_row("last request", self._last_request_line())
        subtitle = "left" if st is not None and st.state == "left" else "Ctrl-C to leave"
        # expand=True with a width: exactly that wide, whatever is inside (expand=False shrinks to fit).
        return Panel(grid, title="llmroom", subtitle=subtitle, expand=True, width=width)

    def _snapshot(self) -> Traffic | None:
        if self.traffic is None:
            return None
        try:
            return self.traffic()
        except Exception:  # the panel must never take the join down: show dashes instead
            return None

    def _requests_line(self) -> Text:
        from rich.text import Text

        t = self._snapshot()
        if t is None:
            return Text("- served · - in flight · - failed")
        line = Text(f"{t.served} served · {t.in_flight} in flight · ")
        line.append(f"{t.failed} failed", style="red" if t.failed else "")
        if t.rejected:
            line.append(f" · {t.rejected} refused")
        return line

    def _last_request_line(self) -> str:
        t = self._snapshot()
        if t is None or (t.last_ttft_ms is None and t.last_tokens_per_s is None):
            return "TTFT - · - tokens/s"
        return f"TTFT {_fmt_ms(t.last_ttft_ms)} · {_fmt_rate(t.last_tokens_per_s)}"


def _request_line(event: dict[str, Any]) -> str:
    """One finished relayed request, as a plain line (never its prompt or answer)."""
    parts = [f"request {event.get('route', '-')} {event.get('status', '-')}"]
    duration = event.get("duration_ms")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool):
        parts.append(f"in {_fmt_ms(duration)}")
    extra = []
    if event.get("ttft_ms") is not None:
        extra.append(f"TTFT {_fmt_ms(event.get('ttft_ms'))}")
    tokens = event.get("tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        extra.append(f"{tokens} tokens")
    if event.get("tokens_per_s") is not None:
        extra.append(_fmt_rate(event.get("tokens_per_s")))
    line = " ".join(parts)
    return f"{line} ({', '.join(extra)})" if extra else line


def _clip(text: str, limit: int) -> str:
    limit = max(1, limit)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _terminal_size() -> tuple[int, int] | None:
    import os

    for fd in (1, 2, 0):
        try:
            size = os.get_terminal_size(fd)
        except (OSError, ValueError):
            continue
        return size.columns, size.lines
    return None


def _console_width(live: Live | None) -> int:
    if live is not None:
        return live.console.width
    size = _terminal_size()
    return size[0] if size is not None else 80


@contextlib.contextmanager
def waiting(message: str, file: IO[str] | None = None) -> Iterator[None]:
    """Say what is being waited for (`hubs` listening for announcements, the LAN fallback): a
    spinner line on a terminal that can redraw, erased when the wait ends; nothing anywhere else
    (scripts read the result, not the wait)."""
    out = file or sys.stderr
    if not live_capable(out):
        yield
        return
    try:
        status = _console(out).status(visible(message), spinner="dots")
        status.start()
    except OSError:  # the terminal is gone: the wait itself still happens
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            status.stop()


def room_url(hub_url: str, code: str) -> str:
    """The room's OpenAI-compatible base URL (options.room_api_url, imported lazily)."""
    from llmroom_cli.options import room_api_url

    return room_api_url(hub_url, code)


def print_text(
    text: str, style: str | None = None, file: IO[str] | None = None, soft_wrap: bool = False
) -> None:
    """A line on a console: styled on a terminal, plain (and without loading rich) elsewhere.
    `soft_wrap`: never break the line (a URL or a command to copy: the terminal folds it on screen,
    and a copy gives it back whole)."""
    out = file or sys.stdout
    text = visible(text)
    if not out.isatty():
        out.write(text + "\n")
        out.flush()
        return
    _console(out).print(text, style=style, highlight=False, markup=False, soft_wrap=soft_wrap)
