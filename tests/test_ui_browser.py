"""`sharpkd ui` in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) opens the MLflow UI on the store of a real pipeline run, finds the experiment, its runs
with their metric columns and a parent's stage runs, and saves a screenshot.

SHARPKD_UPDATE_SCREENSHOT=1 also writes the screenshot to docs/mlflow_ui.png (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import REPO
from test_tracking import _PIPELINE, EXPERIMENTS, STAGES, clean_env, free_port, pipeline_repo, stop, wait_http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
METRIC_COLUMNS = [
    "valid.student.psnr",
    "valid.teacher.psnr",
    "valid.bicubic.psnr",
    "speed.student.torch_cpu.1080p.ms",
]
PARAM_COLUMNS = [key for key, _ in EXPERIMENTS.values()]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]


def chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        # Nothing but 127.0.0.1: no QUIC, updates, sync or other background traffic.
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1920,900",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture
def ui(tmp_path_factory, tmp_path):
    """`sharpkd ui --port N` in the pipeline repository; yields (repo, base URL)."""
    repo = pipeline_repo(tmp_path_factory)
    port = free_port()
    exe = Path(sys.executable).with_name("sharpkd")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from sharpkd.cli import app; app()"]
    log = open(tmp_path / "ui.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*cmd, "ui", "--port", str(port)],
        cwd=repo,
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield repo, f"http://127.0.0.1:{port}", tmp_path / "ui.log"
    finally:
        stop(proc)
        log.close()


def test_mlflow_ui_shows_experiment_runs_and_metrics(ui, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    repo, base, log = ui
    assert f"MLflow UI on {base}" in log.read_text()
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    parents = [client.get_run(run_id) for run_id in _PIPELINE["parents"]]
    baseline = next(r for r in parents if r.data.tags["dvc.exp_name"] == "")

    with tempfile.TemporaryDirectory() as profile:
        driver = chrome(Path(profile))
        wait = WebDriverWait(driver, 120)

        def click(xpath: str) -> None:
            wait.until(EC.element_to_be_clickable((By.XPATH, xpath))).click()

        def table() -> list[tuple[str, dict[str, str]]]:
            # ag-grid renders the pinned name column and the other columns as separate rows.
            return driver.execute_script(
                "return Array.from(document.querySelectorAll('[role=row][row-index]')).map(r => ["
                "r.getAttribute('row-index'), Object.fromEntries(Array.from(r.querySelectorAll('[col-id]'))"
                ".map(c => [c.getAttribute('col-id'), c.innerText.replace(/\\n/g, ' ').trim()]))])"
            )

        try:
            driver.get(base + "/")
            # The home page lists the experiment; the "Model training" view opens it on its runs.
            click("//*[normalize-space(text())='Model training']")
            click("//a[normalize-space(.)='sharpkd']")
            for run in parents:
                wait.until(
                    EC.presence_of_element_located(
                        (By.XPATH, f"//*[contains(text(), '{run.info.run_name}')]")
                    )
                )
            for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
                button.click()  # the assistant side panel

            click("//button[contains(normalize-space(.), 'Columns')]")
            box = (By.CSS_SELECTOR, "input[placeholder='Search columns']")
            for column in ["Dataset", *METRIC_COLUMNS, *PARAM_COLUMNS]:  # Dataset: hidden (empty, wide)
                # The menu re-renders after each choice: find the search box again.
                search = wait.until(EC.element_to_be_clickable(box))
                search.send_keys(Keys.CONTROL, "a")
                search.send_keys(column)
                # The innermost element with that text inside the columns menu (the table has a "Dataset" too).
                click(f"(//*[@role='dialog'][.//input]//*[normalize-space(.)='{column}'])[last()]")
            search = wait.until(EC.element_to_be_clickable(box))
            search.send_keys(Keys.ESCAPE)

            headers = driver.execute_script(
                "return Array.from(document.querySelectorAll('[role=columnheader]')).map(e => e.innerText.trim())"
            )
            for column in METRIC_COLUMNS + PARAM_COLUMNS:
                assert column in headers, headers
            assert "Dataset" not in headers

            rows = table()
            names = {i: c["attributes.`Run Name`"] for i, c in rows if "attributes.`Run Name`" in c}
            values = {i: c for i, c in rows if "metrics.`valid.student.psnr`" in c}
            for run in parents:
                (i,) = [i for i, name in names.items() if name.endswith(" " + run.info.run_name)]
                for metric in METRIC_COLUMNS:
                    shown = values[i][f"metrics.`{metric}`"]
                    assert float(shown) == pytest.approx(run.data.metrics[metric], rel=1e-4), (
                        run.info.run_name,
                        metric,
                    )

            # The baseline execution's parent opens onto one run per stage.
            row = driver.find_element(
                By.XPATH, f"//*[@role='row'][.//*[contains(text(), '{baseline.info.run_name}')]]"
            )
            row.find_element(By.CSS_SELECTOR, "[col-id='attributes.`Run Name`'] button").click()
            wait.until(EC.presence_of_element_located((By.XPATH, "//a[normalize-space(.)='cache_teacher']")))
            shown_names = [c.get("attributes.`Run Name`", "").split(" ")[-1] for _, c in table()]
            assert set(STAGES) <= set(shown_names), shown_names

            shot = tmp_path / "mlflow_ui.png"
            assert driver.save_screenshot(str(shot))
        finally:
            driver.quit()

    from PIL import Image, ImageStat

    with Image.open(shot) as img:
        assert img.width >= 1600 and img.height >= 700
        assert max(ImageStat.Stat(img.convert("L")).stddev) > 10, "the screenshot is blank"
    if os.environ.get("SHARPKD_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, REPO / "docs" / "mlflow_ui.png")
