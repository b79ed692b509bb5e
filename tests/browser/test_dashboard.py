"""The dashboard in a real browser: log in with a token, submit from the form (the API's
validation messages next to their fields), watch the job finish live on the list and on its
page, find it on the compare view, cancel and retry from a job's page, and a read-only token
offered nothing it may not do."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.support.tiny_model import REPO_ID

pytestmark = pytest.mark.browser

JOB_TIMEOUT_MS = 150_000


def small_spec(**changes) -> dict:
    """A job on the tiny model that finishes in seconds on a CPU."""
    spec = {
        "model_id": REPO_ID,
        "method": "rtn",
        "bits": 3,
        "group_size": -1,
        "calibration": {"dataset": "wiki-excerpt", "n_samples": 8, "seq_len": 128},
        "evaluation": {"seq_len": 128, "max_windows": 16},
    }
    spec.update(changes)
    return spec


def _mark_no_reload(page: Page) -> None:
    """A value that only survives while the page is never reloaded or left."""
    page.evaluate("window.__qf_same_page = true")


def _still_same_page(page: Page) -> bool:
    return page.evaluate("window.__qf_same_page === true")


def _login(page: Page, token: str) -> None:
    page.goto("/dashboard/login")
    page.fill("#token", token)
    page.click("#login")
    expect(page.locator("h1")).to_have_text("Jobs")


def _fill_spec(page: Page, spec: dict) -> None:
    calibration, evaluation = spec["calibration"], spec["evaluation"]
    page.fill("#f-model_id", spec["model_id"])
    page.select_option("#f-method", spec["method"])
    page.fill("#f-bits", str(spec["bits"]))
    page.fill("#f-group_size", str(spec["group_size"]))
    page.fill("#f-calibration\\.n_samples", str(calibration["n_samples"]))
    page.fill("#f-calibration\\.seq_len", str(calibration["seq_len"]))
    page.fill("#f-evaluation\\.seq_len", str(evaluation["seq_len"]))
    page.fill("#f-evaluation\\.max_windows", str(evaluation["max_windows"]))


def test_login_submit_watch_and_compare(browser, stack, api, shots: Path):
    token = stack.make_token("ml", "submit,read", "alice")
    page = browser.new_page()
    # Not logged in: the login page; a wrong token is refused there, with the reason.
    page.goto("/dashboard")
    expect(page).to_have_url(f"{stack.url}/dashboard/login?next=%2Fdashboard")
    page.fill("#token", "qf_not-a-real-token")
    page.click("#login")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    _login(page, token)
    expect(page.locator("#who")).to_contain_text("alice")
    expect(page.locator("#nav-submit")).to_be_visible()

    # The jobs list stays open in a second tab and must follow the new job by itself.
    jobs_list = browser.new_page()
    jobs_list.goto("/dashboard")
    expect(jobs_list.locator("#live.on")).to_be_visible()
    _mark_no_reload(jobs_list)

    # Bad input: the API's messages appear next to the fields they name.
    page.goto("/dashboard/submit")
    spec = small_spec()
    _fill_spec(page, {**spec, "bits": 5, "model_id": "not a model id"})
    page.click("#submit")
    bits_error = page.locator('[data-error-for="bits"]')
    expect(bits_error).to_be_visible()
    api_says = api.post("/v1/jobs", json={**spec, "bits": 5, "model_id": "not a model id"})
    assert api_says.status_code == 422
    message = api_says.json()["message"]
    assert bits_error.inner_text() in message and "5-bit" in bits_error.inner_text()
    model_error = page.locator('[data-error-for="model_id"]').inner_text()
    assert model_error in message and "not a model id" in model_error
    page.screenshot(path=shots / "submit-422.png", full_page=True)

    # Fixed: the job is created and its page follows it to the end without reloading.
    _fill_spec(page, spec)
    page.click("#submit")
    expect(page.locator("#job-panel")).to_be_visible()
    job_id = page.locator("#job-panel").get_attribute("data-job")
    _mark_no_reload(page)
    expect(page.locator("#state")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    assert _still_same_page(page)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["owner"] == "alice"
    figures = page.locator("#results")
    expect(figures).to_contain_text(f"{job['results']['ppl_base']:.3f}")
    expect(figures).to_contain_text(f"{job['results']['ppl_change_pct']:+.2f}%")
    expect(page.locator("#artifact")).to_contain_text("model.safetensors")
    expect(page.locator("#log")).to_contain_text("state succeeded")
    page.screenshot(path=shots / "job-succeeded.png", full_page=True)

    # The list tab got the new row and its final state live.
    row = jobs_list.locator(f"#job-{job_id}")
    expect(row.locator(".state")).to_have_text("succeeded", timeout=10_000)
    expect(row).to_contain_text("rtn w3 per-channel asym")
    assert _still_same_page(jobs_list)
    jobs_list.screenshot(path=shots / "jobs-list.png", full_page=True)
    jobs_list.close()

    # The compare view: the job is a point, and alone it is the Pareto front.
    page.goto(f"/dashboard/compare?model={REPO_ID}")
    expect(page.locator(f'circle[data-job="{job_id}"]')).to_have_count(1)
    expect(page.locator(f'#points tr[data-job="{job_id}"]')).to_contain_text("yes")
    page.screenshot(path=shots / "compare.png", full_page=True)
    page.close()


def _running_long_job(api) -> str:
    # Thousands of short evaluation windows keep the job running long enough to cancel it.
    created = api.post("/v1/jobs", json=small_spec(evaluation={"seq_len": 32, "max_windows": 5000}))
    assert created.status_code == 201, created.text
    return created.json()["id"]


def test_cancel_and_retry_from_the_job_page(browser, stack, api, shots: Path):
    page = browser.new_page()
    _login(page, stack.make_token("ml", "submit,read", "bob"))
    job_id = _running_long_job(api)
    page.goto(f"/dashboard/jobs/{job_id}")
    _mark_no_reload(page)
    expect(page.locator("#state")).to_have_text("running", timeout=60_000)
    # In a long phase (thousands of steps), whatever it is called.
    expect(page.locator("#progress .label")).to_have_text(re.compile(r"\d+/\d{4}"), timeout=60_000)
    page.screenshot(path=shots / "job-running.png", full_page=True)

    page.click("#cancel")
    expect(page.locator("#state")).to_have_text("cancelled", timeout=30_000)
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    expect(page.locator("#cancel")).to_have_count(0)

    # Retry: a new attempt of the same job, followed live; cancelled again from the page.
    page.click("#retry")
    expect(page.locator("#state")).to_have_text("running", timeout=60_000)
    page.click("#cancel")
    expect(page.locator("#state")).to_have_text("cancelled", timeout=30_000)
    assert _still_same_page(page)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and job["attempt"] == 2
    page.screenshot(path=shots / "job-cancelled.png", full_page=True)
    page.close()


def test_read_only_token_is_offered_nothing_it_may_not_do(browser, stack, api, shots):
    job_id = _running_long_job(api)
    page = browser.new_page()
    _login(page, stack.make_token("ml", "read", "viewer"))
    expect(page.locator("#who")).to_contain_text("read")
    expect(page.locator("#nav-submit")).to_have_count(0)
    page.goto(f"/dashboard/jobs/{job_id}")
    expect(page.locator("#state")).to_have_text("running", timeout=60_000)
    expect(page.locator("#cancel")).to_have_count(0)
    page.screenshot(path=shots / "viewer-job.png", full_page=True)
    page.goto("/dashboard/submit")
    expect(page.locator("h1")).to_contain_text("submit scope")
    expect(page.locator("#submit-form")).to_have_count(0)

    # Another team's token does not see the job at all.
    page.click("#logout")
    expect(page).to_have_url(f"{stack.url}/dashboard/login")
    _login(page, stack.make_token("other-team", "submit,read", "carol"))
    expect(page.locator(f"#job-{job_id}")).to_have_count(0)
    assert page.goto(f"/dashboard/jobs/{job_id}").status == 404
    page.close()
    # Leave the worker free for whatever runs next.
    api.post(f"/v1/jobs/{job_id}/cancel")
    deadline = time.monotonic() + 30
    while api.get(f"/v1/jobs/{job_id}").json()["state"] != "cancelled":
        assert time.monotonic() < deadline, "the job did not stop after cancel"
        time.sleep(0.3)
