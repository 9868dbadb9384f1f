"""The only module that imports rich: tables, the live join panel, JSON lines and plain lines.

rich is imported only where something is drawn on a terminal: piped and JSON output never load it
(it costs about 40 ms of start-up).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live
    from rich.panel import Panel
    from rich.table import Table

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
PARTICIPANT_COLUMNS = ("ID", "NICKNAME", "MODEL", "STATUS", "GPU", "VRAM", "RAM", "ENDPOINT", "LAST SEEN")
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
            ]
        )
    return rows


# When a terminal is too narrow for a table, columns are dropped in this order (lowest first; ties:
# the rightmost first); unlisted columns are never dropped. What is kept is cut with an ellipsis, never
# split inside a word, except the free-text columns of WRAPPED, which wrap at spaces.
DROP_ORDER: dict[str, int] = {
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


class Watcher:
    """`list --watch`: a live table on a terminal, repeated plain output when piped."""

    def __init__(self, columns: Sequence[str], title: str) -> None:
        self.columns = columns
        self.title = title
        self.live: Live | None = None
        # Set when the terminal or the reader went away (EIO, EPIPE): the caller stops watching.
        self.broken = False
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(console=_console(), auto_refresh=False, transient=False)
            self.live.start()

    def show(self, rows: list[list[str]], dim: list[bool], note: str = "") -> None:
        if self.broken:
            return
        try:
            self._show(rows, dim, note)
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
            self.live.update(Group(build_table(self.columns, rows, dim), caption), refresh=True)
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


class JoinOutput:
    """Renders session events: JSON lines, plain state lines, a live panel, or nothing (quiet)."""

    def __init__(self, mode: str, info: dict[str, str], clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode  # "json" | "plain" | "live" | "quiet"
        self.info = info
        self.clock = clock
        self.status: Status | None = None
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._stop_refresh = threading.Event()
        self._refresher: threading.Thread | None = None
        # Called once if whoever reads our stdout goes away (`join --json | head -1`): the CLI then
        # leaves and exits as on a signal, instead of heartbeating for nobody.
        self.on_broken: Callable[[], None] | None = None
        self.broken = False

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
        if self.mode == "json":
            sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        elif self.mode == "plain":
            line = self._plain(event)
            if line:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        elif self.mode == "live":
            if event["event"] == "joined" and self._live is None:
                self._start_live()
            elif event["event"] == "left":
                self._stop_live()
                line = self._plain(event)
                if line:
                    _console(sys.stderr).print(line, highlight=False, markup=False)
            elif self._live is not None:
                self._live.update(self._panel(), refresh=True)

    def _plain(self, event: dict[str, Any]) -> str | None:
        line = self._plain_raw(event)
        return visible(line) if line is not None else None

    def _plain_raw(self, event: dict[str, Any]) -> str | None:
        name = event["event"]
        if name == "joined":
            return (
                f"joined room {event['room']} on {event['hub']} as {event['nickname']} "
                f"sharing {event['model']} from {event['endpoint']} (id {event['id']})"
            )
        if name == "reconnecting":
            if event.get("attempt") == 1:
                return f"reconnecting: {event.get('reason')}"
            return None
        if name == "online":
            return "back online"
        if name == "rejoined":
            return "the hub had forgotten us: rejoined"
        if name == "left":
            # An unconfirmed leave is one warning on stderr (with the cleanup command), from the CLI.
            return "left the room" if event.get("confirmed") else None
        return None

    # -- the live panel ---------------------------------------------------------------------------

    def _start_live(self) -> None:
        from rich.live import Live

        self._live = Live(self._panel(), console=_console(), auto_refresh=False, transient=False)
        self._live.start()
        self._refresher = threading.Thread(target=self._refresh_loop, name="llmroom-panel", daemon=True)
        self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stop_refresh.wait(1.0):
            with self._lock:
                if self._live is not None and not self.broken:
                    try:
                        self._live.update(self._panel(), refresh=True)
                    except OSError:
                        self._reader_gone()

    def _stop_live(self) -> None:
        self._stop_refresh.set()
        live, self._live = self._live, None
        if live is not None:
            try:
                if not self.broken:
                    live.update(self._panel(), refresh=True)
                live.stop()
            except OSError:
                self._reader_gone()

    def close(self) -> None:
        with self._lock:
            self._stop_live()

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
            self._live.console.print(text, highlight=False, markup=False)
            if table is not None:
                self._live.console.print(build_table(*table))
            return
        out = sys.stderr if self.mode == "json" else sys.stdout
        out.write(text + "\n")
        if table is not None:
            for row in table[1]:
                out.write("\t".join(visible(cell) for cell in row) + "\n")
        out.flush()

    def _panel(self) -> Panel:
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        st = self.status
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key in ("room", "hub", "nickname", "model", "endpoint", "id"):
            grid.add_row(key, Text(visible(str(self.info.get(key, "-")))))
        if st is not None:
            colour = {"online": "green", "reconnecting": "yellow", "leaving": "blue", "left": "blue"}.get(
                st.state, "white"
            )
            state = Text(st.state, style=f"bold {colour}")
            if st.state == "reconnecting" and st.last_error:
                state.append(f"  {visible(st.last_error)}", style="yellow")
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
        subtitle = "left" if st is not None and st.state == "left" else "Ctrl-C to leave"
        return Panel(grid, title="llmroom", subtitle=subtitle, expand=False)


def print_text(text: str, style: str | None = None, file: IO[str] | None = None) -> None:
    """A line on a console: styled on a terminal, plain (and without loading rich) elsewhere."""
    out = file or sys.stdout
    text = visible(text)
    if not out.isatty():
        out.write(text + "\n")
        out.flush()
        return
    _console(out).print(text, style=style, highlight=False, markup=False)
