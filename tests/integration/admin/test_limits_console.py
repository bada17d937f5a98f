"""The console's request limits: shown per service, set and cleared with the form, under the same
login and CSRF rules as the weight form."""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import TEST_ENV, wait_until
from console_fixtures import CREDENTIALS, chromium, console_server  # noqa: F401 - the fixtures "browser", "console"

from thriftprobe.limits import MethodLimit, limits_field
from thriftprobe.registry.zookeeper import limits_path
from thriftprobe.stores.limits import limits_key

SERVICE = "Calculator"


def _post(opener, url, body, csrf=None):
    headers = {"Content-Type": "application/json"}
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with opener.open(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _login(console):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": CREDENTIALS.username, "password": CREDENTIALS.password}).encode()
    page = opener.open(console.url + "login", data=form, timeout=10).read().decode()
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    return opener, csrf


def test_the_limits_api_needs_login_and_csrf_and_checks_its_input(console, appkey):
    anonymous = urllib.request.build_opener()
    assert _post(anonymous, console.url + "api/limit", {"appkey": appkey})[0] == 401
    opener, csrf = _login(console)
    body = {"appkey": appkey, "service": SERVICE, "method": "add", "qps": 5}
    assert _post(opener, console.url + "api/limit", body)[0] == 403
    assert _post(opener, console.url + "api/limit", body, csrf="forged")[0] == 403
    for bad, message in [({**body, "qps": "5"}, "qps must be a number"), ({**body, "method": 7}, "strings"),
                         ({**body, "qps": None}, "nothing to set"), ({**body, "method": "x y"}, "invalid")]:
        status, reply = _post(opener, console.url + "api/limit", bad, csrf)
        assert (status, message in reply["error"]) == (400, True), reply
    status, reply = _post(opener, console.url + "api/limit", body, csrf)
    assert status == 200 and reply["change"]["rev"] == 1 and reply["change"]["pushed"]
    listed = json.loads(opener.open(console.url + "api/limits", timeout=10).read())
    [view] = [v for v in listed["services"] if v["appkey"] == appkey]
    assert view["methods"] == {"add": {"qps": 5}} and view["in_step"]
    assert listed["history"][0]["actor"] == "console:ops" and listed["history"][0]["source"] == "console"
    status, reply = _post(opener, console.url + "api/limit", {**body, "method": "echo", "clear": True}, csrf)
    assert status == 404 and "nothing to clear" in reply["error"]


def test_the_limits_api_shows_pushed_limits_that_differ_from_the_record_or_outlived_it(
    console, gov, zk, rds, appkey
):
    gov.set_limit(appkey, SERVICE, "add", qps=5)
    zk.set(limits_path(TEST_ENV, appkey, SERVICE), b'{"rev": 9, "methods": {"add": {"concurrency": 1}}}')
    opener, _ = _login(console)

    def view():  # type: ignore[no-untyped-def]
        listed = json.loads(opener.open(console.url + "api/limits", timeout=10).read())
        return [v for v in listed["services"] if v["appkey"] == appkey]

    [v] = view()
    assert (v["methods"], v["pushed_methods"], v["follows"], v["in_step"]) == (
        {"add": {"qps": 5}}, {"add": {"concurrency": 1}}, "pushed", False)
    rds.hdel(limits_key(TEST_ENV), limits_field(appkey, TEST_ENV, SERVICE))
    [v] = view()
    assert (v["recorded"], v["methods"], v["pushed_rev"], v["follows"]) == (False, None, 9, "pushed")


@pytest.mark.slow
def test_operator_sets_and_clears_a_limit_with_the_console_form(console, browser, providers, appkey):
    svc = providers("a", audit_interval=60.0)
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(console.url)
    page.fill("#username", CREDENTIALS.username)
    page.fill("#password", CREDENTIALS.password)
    page.click("#login")
    page.wait_for_selector("#limit-form")
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    page.fill("#limit-appkey", appkey)
    page.fill("#limit-service", SERVICE)
    page.fill("#limit-method", "compute")
    page.fill("#limit-qps", "40")
    page.fill("#limit-concurrency", "3")
    page.click("#limit-set")
    wait_until(lambda: svc.limits.get("compute") == MethodLimit(qps=40, concurrency=3), 10, "the provider's limits")
    row = page.locator('tr[data-limit="%s/%s/compute"]' % (appkey, SERVICE))
    row.locator("td.limit").filter(has_text="qps 40 concurrency 3").wait_for(timeout=10000)
    assert "stored (rev 1)" in page.inner_text("#status")
    row.locator("button.clear-limit").click()
    wait_until(lambda: svc.limits.get("compute") is None and svc.limits.rev == 2, 10, "the cleared limit")
    row.wait_for(state="detached", timeout=10000)
    assert dialogs == ["Set the limits of %s/%s compute?" % (appkey, SERVICE),
                       "Clear the limits of %s/%s compute?" % (appkey, SERVICE)]
