"""The Gradio parts app.py is built from: number boxes whose refusals name their field, a widget for any
plan setting made from its description, and a login check in front of every route (`--auth`). Imports
gradio; of Tunewise only the advisor's descriptions of the settings."""

from __future__ import annotations

import gradio as gr

from advisor import wizard


def number_with_named_range():
    """A gr.Number factory whose refusals name the field: a value out of range gets the range that fits
    (Gradio's own says only "Value 0 is less than minimum value 1."), and text, a list, NaN or infinity
    get "must be a number" (Gradio's own error there is not shown at all). It wraps each instance's
    `preprocess` rather than subclassing: a Component subclass makes Gradio write a .pyi file beside
    this module."""

    def Number(name: str, **kwargs):  # noqa: N802 (used like the class it stands for)
        """The number box for plan widget `name`, bounded by wizard.NUMBER_LIMITS."""
        low, high = wizard.NUMBER_LIMITS[name]
        component = gr.Number(minimum=low, maximum=high, **kwargs)
        check = component.preprocess

        def preprocess(payload):
            problem = wizard.number_problem(payload, component.minimum, component.maximum)
            if problem:
                raise gr.Error(f"{component.label}: {problem}.", title="Check this value")
            return check(payload)

        component.preprocess = preprocess
        return component

    return Number


def setting_widget(setting, Number):  # noqa: N803 (Number stands for gr.Number)
    """A widget for plan setting `setting` (an advisor.plan.Setting) from its description alone: a checkbox,
    a menu of its choices, a number box bounded by its range, or a text box; labelled as the plan labels it,
    with its help as the info line, and its plan default as the value."""
    info = setting.help.split(". ")[0].rstrip(".") + "."
    common = dict(label=setting.label, info=info, elem_id=f"setting-{setting.name.replace('_', '-')}")
    if setting.type is bool:
        return gr.Checkbox(value=bool(setting.default), **common)
    if setting.choices:
        return gr.Dropdown(choices=list(setting.choices), value=setting.default, **common)
    if setting.type in (int, float) and setting.name in wizard.NUMBER_LIMITS and setting.default is not None:
        return Number(setting.name, value=setting.default, precision=0 if setting.type is int else None, **common)
    # An optional number that is unset by default (save every N steps, GPU memory in GB) is a text box: empty
    # means "not set" (a number box cannot be empty without making its API parameter required).
    return gr.Textbox(value=setting.default or "", placeholder="not set" if setting.optional else "", **common)


class RequireLogin:
    """ASGI middleware: with a login (`--auth`), only the login page and what it loads answer without the
    login cookie. Gradio checks the login on most of its routes but not on all of them (POST
    /gradio_api/cancel and /gradio_api/reset answer anyone), so this checks it once, in front of every
    route, the way Gradio does (its `access-token` cookie, looked up in the app's tokens)."""

    #: What the login page needs before anyone has logged in (Gradio's own routes check /config).
    PUBLIC = frozenset({"/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico", "/theme.css",
                        "/robots.txt", "/manifest.json", "/pwa_icon", "/gradio_api/startup-events"})
    PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon/")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self._allowed(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            from starlette.responses import JSONResponse

            await JSONResponse({"detail": "Not authenticated"}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        server = scope.get("app")
        if getattr(server, "auth", None) is None and getattr(server, "auth_dependency", None) is None:
            return True  # no login asked for
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in self.PUBLIC or path.startswith(self.PUBLIC_PREFIXES):
            return True
        if getattr(server, "auth_dependency", None) is not None:
            return True  # an external login (not used by this app) is Gradio's to check
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope).cookies
        cookie_id = getattr(server, "cookie_id", "")
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return token is not None and token in getattr(server, "tokens", {})


def patient_url_ok(url: str, attempts: int = 30, timeout_s: float = 10.0) -> bool:
    """Gradio's launch check that the page answers on localhost, with patience: Gradio gives the first render
    of the page one try of 3 s and then refuses to start ("When localhost is not accessible..."). This page
    has a few hundred components, and on a busy 2-core machine (a CPU Space, CI) its first render can take
    longer. Same answer as Gradio's for a server that really is not reachable, after `attempts` tries."""
    import time

    import httpx

    for _ in range(attempts):
        try:
            if httpx.head(url, timeout=timeout_s, verify=False).status_code in (200, 401, 301, 302, 303, 307, 308):
                return True
        except (httpx.ConnectError, httpx.TimeoutException):
            pass
        time.sleep(0.5)
    return False
