"""Chat templates: Hugging Face `apply_chat_template` semantics in a bounded jinja2 sandbox.

A `ChatTemplate` compiles a model's jinja2 chat template once (the gateway reuses it for every request) in
an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the helpers transformers
provides (`raise_exception`, a `tojson` filter that does not HTML-escape, `strftime_now`, the `loopcontrols`
extension and a no-op `{% generation %}` block), and renders it with `messages`, `add_generation_prompt`,
`bos_token` and `eos_token`.

Templates come from model repositories and service files, so they are treated as hostile:

* the sandbox blocks Python internals (`''.__class__`, `.mro()`, `__globals__`, mutating lists/dicts ...);
* a render has a time limit (`max_render_seconds`): the deadline is checked on every loop iteration
  (each `{% for %}` iterable is wrapped at compile time), call, attribute/item lookup, filter and operator,
  so nested loops and exponential macro recursion stop promptly — no threads are killed;
* every string the template builds is bounded (`max_output_chars`): the final output, `{% set %}` /
  macro / filter-block buffers, `~` and `+` concatenations, `*` repetition, `%` and `str.format` widths,
  filter and method results (including `join` and `replace`, checked before they allocate); `**` and
  integer products are capped in size; `range()` is capped by the sandbox (100 000 items).

Every failure is a `TemplateError` whose `str()` is the template's own message (e.g. `raise_exception`
text) or a short description of the limit that was hit.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "TemplateError", "DEFAULT_MAX_OUTPUT_CHARS", "DEFAULT_MAX_RENDER_SECONDS"]

DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
DEFAULT_MAX_RENDER_SECONDS = 2.0
# A power whose result would have more bits than this is refused (a 1 MB decimal string is ~3.3 Mbit).
_MAX_INT_BITS = 4_000_000


class TemplateError(Exception):
    """A chat template failed to compile or to render; `str(err)` is the template's message."""


class _LimitExceeded(Exception):
    """Raised inside a render when a resource limit is hit (turned into a `TemplateError`)."""


class _Limits:
    __slots__ = ("deadline", "max_chars", "max_seconds")

    def __init__(self, max_seconds: float, max_chars: int) -> None:
        self.max_seconds = max_seconds
        self.max_chars = max_chars
        self.deadline = time.monotonic() + max_seconds


_CURRENT: contextvars.ContextVar[_Limits | None] = contextvars.ContextVar("ray_dstack_template_limits", default=None)


def _limits() -> _Limits | None:
    limits = _CURRENT.get()
    if limits is not None and time.monotonic() > limits.deadline:
        raise _LimitExceeded(f"chat template rendering took longer than {limits.max_seconds:g} s")
    return limits


def _size(value: Any, budget: int) -> int:
    """Characters `value` would take if rendered; stops counting once over `budget`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        total = len(value)
        items = value.items() if isinstance(value, dict) else value
        for item in items:
            if total > budget:
                break
            total += _size(item, budget - total)
        return total
    return 0


def _check_value(value: Any) -> Any:
    limits = _limits()
    if limits is not None and isinstance(value, (str, list, tuple, dict, set, frozenset)):
        if _size(value, limits.max_chars) > limits.max_chars:
            raise _LimitExceeded(f"chat template output is larger than {limits.max_chars} characters")
    return value


def _check_new_size(size: int) -> None:
    limits = _limits()
    if limits is not None and size > limits.max_chars:
        raise _LimitExceeded(f"chat template output is larger than {limits.max_chars} characters")


def _check_int_args(args: Iterable[Any]) -> None:
    limits = _CURRENT.get()
    if limits is None:
        return
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > limits.max_chars:
            raise _LimitExceeded(f"chat template argument {arg} is larger than the limit of {limits.max_chars}")


# A replacement field (`{:>999999999}`) or `%` conversion (`%999999999s`) with a huge width or precision.
_BIG_FORMAT_FIELD = re.compile(r"\{[^{}]*\d{7,}[^{}]*\}")
_BIG_PERCENT_FIELD = re.compile(r"%[-#0 +(\w)]*?\d{7,}")


def _check_format_string(fmt: Any, pattern: re.Pattern[str]) -> None:
    if isinstance(fmt, str) and pattern.search(fmt):
        raise _LimitExceeded("chat template format width is too large")


def _precheck_str_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse string methods whose result would be huge, before they allocate it."""
    self_ = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(self_, str):
        return
    if name in ("format", "format_map"):
        _check_format_string(self_, _BIG_FORMAT_FIELD)
    elif name == "join" and args:
        items = args[0]
        if isinstance(items, (list, tuple)):
            _check_new_size(sum(_size(i, 1 << 62) for i in items) + len(self_) * len(items))
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = self_.count(args[0]) if args[0] else len(self_) + 1
        _check_new_size(len(self_) + count * len(args[1]))
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _check_new_size(len(self_) + self_.count("\t") * max(tab, 0))


def _guard_iter(iterable: Any) -> Iterator[Any]:
    """Wraps every `{% for %}` iterable: the deadline is checked on each iteration."""
    limits = _CURRENT.get()
    if limits is None:
        yield from iterable
        return
    deadline = limits.deadline
    monotonic = time.monotonic
    for item in iterable:
        if monotonic() > deadline:
            raise _LimitExceeded(f"chat template rendering took longer than {limits.max_seconds:g} s")
        yield item


class _BoundedBuffer(list):
    """The buffer of `{% set %}` blocks, macros, call and filter blocks: bounded in size and time."""

    __slots__ = ("_chars",)

    def __init__(self) -> None:
        super().__init__()
        self._chars = 0

    def append(self, item: Any) -> None:
        limits = _limits()
        if limits is not None:
            self._chars += len(item) if isinstance(item, str) else _size(item, limits.max_chars)
            if self._chars > limits.max_chars:
                raise _LimitExceeded(f"chat template output is larger than {limits.max_chars} characters")
        super().append(item)

    def extend(self, items: Iterable[Any]) -> None:
        for item in items:
            self.append(item)


def _bounded_join(parts: Iterable[Any]) -> str:
    """`str_join` replacement for `~` (Concat nodes)."""
    pieces = [str(p) if not isinstance(p, str) else p for p in parts]
    _check_new_size(sum(len(p) for p in pieces))
    return "".join(pieces)


class _BoundedCodeGenerator(CodeGenerator):
    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.rd_new_buffer()")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # type: ignore[override]
        # No constant folding here: the guard must see the (possibly huge) result at render time.
        self.write("environment.rd_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


_GUARD_FILTER = "rd_guard_iter"


def _wrap_filter(func: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _limits()
        _check_int_args(args[1:] if not _takes_context(func) else args[2:])
        _check_int_args(kwargs.values())
        _precheck_filter(func, args, kwargs)
        return _check_value(func(*args, **kwargs))

    for attr in ("jinja_pass_arg", "__name__", "__doc__", "__wrapped__"):
        if hasattr(func, attr):
            try:
                setattr(guarded, attr, getattr(func, attr))
            except (AttributeError, TypeError):
                pass
    guarded.__wrapped__ = func  # type: ignore[attr-defined]
    return guarded


def _takes_context(func: Any) -> bool:
    return getattr(func, "jinja_pass_arg", None) is not None


def _precheck_filter(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    name = getattr(func, "__name__", "")
    values = list(args)
    if _takes_context(func) and values:
        values = values[1:]
    if not values:
        return
    value = values[0]
    if name == "do_join":
        items = list(value) if isinstance(value, (list, tuple)) else None
        sep = values[1] if len(values) > 1 else kwargs.get("d", "")
        if items is not None:
            _check_new_size(sum(_size(i, 1 << 62) for i in items) + len(str(sep)) * len(items))
    elif name == "do_replace" and len(values) >= 3:
        s, old, new = str(value), str(values[1]), str(values[2])
        count = s.count(old) if old else len(s) + 1
        _check_new_size(len(s) + count * len(new))
    elif name == "do_format":
        _check_format_string(value, _BIG_PERCENT_FIELD)


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _GenerationTag],
        )

        def raise_exception(message: Any) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            # transformers' tojson: no HTML escaping, and its options.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(format: str) -> str:  # noqa: A002 - the name templates use
            return datetime.now().strftime(format)

        self.filters["tojson"] = tojson
        self.globals["raise_exception"] = raise_exception
        self.globals["strftime_now"] = strftime_now
        self.filters = {name: _wrap_filter(f) for name, f in self.filters.items()}
        self.filters[_GUARD_FILTER] = _guard_iter
        self.rd_new_buffer = _BoundedBuffer
        self.rd_join = _bounded_join

    # -- compile: wrap every loop iterable in the deadline guard -----------------------------------------
    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _GUARD_FILTER, [], [], None, None, lineno=loop.lineno)
        return tree

    # -- render-time hooks ---------------------------------------------------------------------------
    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _limits()
        _check_int_args(args)
        _check_int_args(kwargs.values())
        _precheck_str_method(getattr(__obj, "__wrapped__", __obj), args, kwargs)
        return _check_value(super().call(__context, __obj, *args, **kwargs))

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja returns an Undefined that only fails when used; refuse at once instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe.")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _limits()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _limits()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _limits()
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and not isinstance(n, bool) and isinstance(seq, (str, list, tuple)):
                limits = _CURRENT.get()
                if limits is not None:
                    _check_new_size(_size(seq, limits.max_chars) * max(n, 0))
            elif isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise _LimitExceeded("chat template integer is too large")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(left) > 1:
                if right > 0 and right * math.log2(abs(left)) > _MAX_INT_BITS:
                    raise _LimitExceeded("chat template integer is too large")
        elif operator == "%":
            _check_format_string(left, _BIG_PERCENT_FIELD)
            _check_int_args(right if isinstance(right, tuple) else (right,))
        return _check_value(self.binop_table[operator](left, right))


class ChatTemplate:
    """A compiled chat template; `render` is safe to call many times (and from several threads)."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        max_render_seconds: float = DEFAULT_MAX_RENDER_SECONDS,
    ) -> None:
        if not isinstance(source, str):
            raise TemplateError(f"chat template must be a string, not {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_output_chars = max_output_chars
        self.max_render_seconds = max_render_seconds
        env = _Environment()
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            where = f" (line {err.lineno})" if err.lineno else ""
            raise TemplateError(f"chat template syntax error{where}: {err.message}") from None
        except (jinja2.TemplateError, RecursionError, MemoryError, ValueError, TypeError) as err:
            raise TemplateError(f"chat template does not compile: {err}") from None

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render the prompt for `messages`; `extra` reaches the template as variables (e.g. `tools`)."""
        variables: dict[str, Any] = {"tools": None, "documents": None}
        variables.update(extra)
        variables["messages"] = messages
        variables["add_generation_prompt"] = add_generation_prompt
        variables.setdefault("bos_token", self.bos_token if self.bos_token is not None else "")
        variables.setdefault("eos_token", self.eos_token if self.eos_token is not None else "")
        limits = _Limits(self.max_render_seconds, self.max_output_chars)
        token = _CURRENT.set(limits)
        try:
            parts: list[str] = []
            total = 0
            for part in self._template.generate(variables):
                total += len(part)
                if total > limits.max_chars:
                    raise _LimitExceeded(f"chat template output is larger than {limits.max_chars} characters")
                if time.monotonic() > limits.deadline:
                    raise _LimitExceeded(f"chat template rendering took longer than {limits.max_seconds:g} s")
                parts.append(part)
            return "".join(parts)
        except _LimitExceeded as err:
            raise TemplateError(str(err)) from None
        except SecurityError as err:
            message = str(err)
            if message.endswith(" is unsafe."):
                message = message[: -len(" is unsafe.")] + " is not allowed"
            raise TemplateError(message) from None
        except jinja2.TemplateError as err:
            raise TemplateError(err.message if err.message is not None else type(err).__name__) from None
        except RecursionError:
            raise TemplateError("chat template recursion is too deep") from None
        except MemoryError:
            raise TemplateError("chat template used too much memory") from None
        except Exception as err:  # a template error surfaced as a Python error (TypeError, KeyError ...)
            raise TemplateError(f"chat template failed: {type(err).__name__}: {err}") from None
        finally:
            _CURRENT.reset(token)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.source[:40]!r}...)"
