"""Importing the application ``lapse serve`` serves, and checking what it is.

``load_target("myapp:site", app_dir)`` imports ``myapp`` with the reactor
guarded (a module that listens or runs the reactor when imported is refused:
it is a program), and ``check_app`` says whether the object is a Site or an
ASGI application; every failure is one :class:`CommandError` line.
"""

from __future__ import annotations

import importlib
import inspect
import traceback
import types
from pathlib import Path
from typing import Any, NoReturn

from lapse.cli.common import CommandError

__all__ = ["check_app", "load_target"]


class _ServesItself(BaseException):
    """Raised by the reactor hook: the imported module listens or runs by itself.

    A BaseException, so that an ``except Exception`` in the module lets it by.
    """

    def __init__(self, call: str) -> None:
        super().__init__(call)
        self.call = call


def _refuse_serving(call: str) -> NoReturn:
    raise _ServesItself(call)


def _caller_outside_lapse(tb: types.TracebackType | None) -> str:
    """``file:line`` of the innermost frame of ``tb`` outside lapse and importlib."""
    package = str(Path(__file__).resolve().parent.parent)
    where = "?"
    for frame in traceback.extract_tb(tb):
        name = frame.filename
        if name.startswith("<frozen") or str(Path(name).resolve()).startswith(package):
            continue
        where = f"{name}:{frame.lineno}"
    return where


def _import_module(module_name: str, app_dir: str) -> types.ModuleType:
    from lapse.internet.reactor import theReactor

    theReactor._on_serve = _refuse_serving
    try:
        return importlib.import_module(module_name)
    except _ServesItself as exc:
        where = _caller_outside_lapse(exc.__traceback__)
        raise CommandError(
            f"module {module_name!r} serves itself when imported: it calls "
            f"reactor.{exc.call}() at {where}. It is a program: run it with python. "
            f"To serve it with 'lapse serve', put its reactor.listenTCP/listenSSL and "
            f"reactor.run() calls under 'if __name__ == \"__main__\":'."
        ) from None
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise CommandError(
                f"no module named {missing!r} (looked in --app-dir {app_dir} and the "
                "installed packages)"
            ) from None
        raise CommandError(
            f"importing {module_name!r} failed at {_caller_outside_lapse(exc.__traceback__)}: {exc}"
        ) from None
    except SyntaxError as exc:
        raise CommandError(
            f"importing {module_name!r} failed: {exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}"
        ) from None
    except SystemExit as exc:
        raise CommandError(f"importing {module_name!r} exited (sys.exit({exc.code!r}))") from None
    except Exception as exc:
        where = _caller_outside_lapse(exc.__traceback__)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise CommandError(f"importing {module_name!r} failed at {where}: {detail}") from None
    finally:
        theReactor._on_serve = None


def load_target(target: str, app_dir: str) -> Any:
    """The object ``MODULE:ATTR`` names; :class:`CommandError` if none.

    Importing is guarded: a module that calls ``reactor.listenTCP``,
    ``listenSSL`` or ``run`` while it is imported is refused.
    """
    module_name, colon, attr = target.partition(":")
    if not colon or not module_name.strip() or not attr.strip():
        raise CommandError(
            f"{target!r} is not MODULE:ATTR: name a module and the Site or ASGI app in it, "
            "e.g. myapp:site"
        )
    module = _import_module(module_name, app_dir)
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            hint = _sites_in(module)
            raise CommandError(
                f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attr!r}" + (f"; its Sites: {', '.join(hint)}" if hint else "")
            ) from None
    return found


def _sites_in(module: types.ModuleType) -> list[str]:
    from lapse.web.server import Site

    return sorted(name for name, value in vars(module).items() if isinstance(value, Site))


def check_app(app: Any, target: str) -> str:
    """What ``app`` is (``"a Site"``, ``"an ASGI app"``); an error if neither."""
    from lapse.web.resource import Resource
    from lapse.web.server import Site

    if isinstance(app, Site):
        return "a Site"
    what = f"{target} is not a lapse Site nor an ASGI application"
    if isinstance(app, Resource):
        raise CommandError(f"{target} is a Resource, not a Site: serve Site(resource) instead")
    if isinstance(app, types.ModuleType):
        raise CommandError(f"{what}: it is a module; name the Site or app in it")
    if inspect.isclass(app):
        raise CommandError(
            f"{what}: it is a class; name an instance (an ASGI 3 application is an "
            "async callable taking scope, receive and send)"
        )
    if not callable(app):
        raise CommandError(f"{what}: it is a {type(app).__name__}")
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):
        return "an ASGI app"
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise CommandError(
            f"{what}: it cannot be called with (scope, receive, send); its signature is {signature}"
        ) from None
    return "an ASGI app"
