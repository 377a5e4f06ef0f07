"""The web page (`python -m lgg app`), driven in a real browser: headless Chromium (Debian's package,
which `.ci/run` installs) through Playwright, against the app started on a free localhost port."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile

import nibabel as nib
import numpy as np
import pytest
from test_volumes import CASE, SPACING, as_ras, kaggle_volume

from lgg import app, predict

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# as root in a closed network: no sandbox, and no background connections that the network refuses
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "lgg", "app", "--port", str(port)], stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        message = f"no Chromium at {CHROMIUM}: `apt-get install chromium` (as .ci/run does)"
        if os.environ.get("LGG_REQUIRE_BROWSER"):  # set by .ci/run: there a missing browser is a failure
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def upload(browser, url, path, screenshot=None):
    """Open the page, upload `path`, press Segment; return (page, seconds to the first result or error)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#segment", timeout=60_000)
    page.locator("#upload input[type=file]").set_input_files(str(path))
    page.wait_for_selector(f"#upload :text('{path.name}')", timeout=30_000)  # the upload has reached the server
    start = time.perf_counter()
    page.click("#segment")
    page.wait_for_selector("#summary :text('segmented in'), [data-testid=toast-text]", timeout=120_000)
    seconds = time.perf_counter() - start
    if screenshot:
        page.screenshot(path=str(screenshot), full_page=True)
    return page, seconds


@pytest.fixture(scope="module")
def shipped_figures(real_data, tmp_path_factory):
    """What the command line's `predict` gives for the case with the shipped model (whichever ships): the page
    must show the same tumor voxels, the same tumor slices and the same first tumor slice."""
    rows = []
    out = tmp_path_factory.mktemp("cli") / "predicted"
    predict.predict_paths(None, [real_data / CASE], out, collect=rows)
    (_, slice_indices, _, _, row) = rows[0]
    areas = [int(a) for a in row["tumor_area_px_per_slice"].split()]
    first = next(index for index, area in zip(slice_indices, areas, strict=True) if area)
    return {"voxels": row["tumor_area_px_total"], "slices": row["tumor_slices"], "total": row["slices"], "first": first}


@pytest.fixture(scope="module")
def nifti_case(real_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("uploads") / f"{CASE}.nii.gz"
    ras = as_ras(kaggle_volume(real_data)).astype(np.float32) * 4.0
    nib.save(nib.Nifti1Image(ras, np.diag([*SPACING, 1.0])), path)
    return path


def test_a_real_case_as_nifti_shows_its_outline_and_volume(server, browser, nifti_case, shipped_figures, tmp_path):
    page, seconds = upload(browser, server, nifti_case, screenshot=tmp_path / "result.png")
    summary = page.locator("#summary").inner_text()
    assert "tumor volume" in summary and " ml" in summary, summary
    # the figure the command line gives for the same case (its voxels at 0.94 x 0.94 x 3 mm)
    assert f"{shipped_figures['voxels'] * np.prod(SPACING) / 1000:.2f} ml" in summary, summary
    assert page.locator("#slice img").count() == 1 and page.locator("#montage img").count() == 1
    assert f"slice {shipped_figures['first']}" in page.locator("#slice-label").inner_text()  # the first with tumor
    assert f"{CASE}_pred.nii.gz" in "".join(page.locator("#downloads").inner_text().split())
    links = [page.locator("#downloads a").nth(i).get_attribute("href") for i in range(2)]
    mask = tmp_path / "downloaded.nii.gz"
    mask.write_bytes(urllib.request.urlopen(urllib.parse.urljoin(server, links[0]), timeout=30).read())
    downloaded = nib.load(mask)
    assert (
        downloaded.shape == nib.load(nifti_case).shape[:3]
        and int(np.asarray(downloaded.dataobj).sum()) == shipped_figures["voxels"]
    )
    assert (tmp_path / "result.png").stat().st_size > 10_000
    print(f"first result {seconds:.1f} s after pressing Segment")
    assert seconds < 60  # the target is 10 s on an idle 2-core CPU; CI machines are shared
    page.close()


def test_bad_uploads_get_a_message_and_the_app_keeps_serving(
    server, browser, nifti_case, real_data, shipped_figures, tmp_path
):
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4\n" + bytes(200))
    whole = nifti_case.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(whole[: len(whole) // 3])
    two = np.asarray(nib.load(nifti_case).dataobj)[..., :2]
    nib.save(nib.Nifti1Image(two, np.diag([*SPACING, 1.0])), tmp_path / "two.nii.gz")
    expected = {
        "paper.pdf": "not a NIfTI volume (.nii, .nii.gz), a zip",
        "truncated.nii.gz": "truncated.nii.gz: not a readable NIfTI volume",
        "two.nii.gz": "not (X, Y, Z, 3)",
    }
    for name, message in expected.items():
        page, _ = upload(browser, server, tmp_path / name)
        toast = page.locator("[data-testid=toast-text]").first.inner_text()
        assert message in toast, (name, toast)
        assert "Traceback" not in page.content() and "/request-" not in toast
        page.close()
    # still serving: a zip of a real case folder (its manual masks drawn in green)
    with zipfile.ZipFile(tmp_path / f"{CASE}.zip", "w") as bundle:
        for path in sorted((real_data / CASE).glob("*.tif")):
            bundle.write(path, f"{CASE}/{path.name}")
    page, _ = upload(browser, server, tmp_path / f"{CASE}.zip", screenshot=tmp_path / "zip.png")
    summary = page.locator("#summary").inner_text()
    f = shipped_figures
    assert f"{CASE}: tumor on {f['slices']} of {f['total']} slices" in summary and f"{f['voxels']} px" in summary
    page.close()


def test_uploads_are_arranged_or_refused_by_name(real_data, tmp_path):
    """Without the browser: .png slices become the .tif files predict reads; archives cannot write
    outside their folder; an unknown file type is named."""
    import tifffile
    from PIL import Image

    slices = tmp_path / "slices"
    slices.mkdir()
    images = kaggle_volume(real_data)
    Image.fromarray(images[11]).save(slices / f"{CASE}_12.png")
    Image.fromarray(images[11][:100]).save(slices / "small.png")
    (tmp_path / "in").mkdir()
    inputs, sequences = app.arrange([slices / f"{CASE}_12.png"], {"pre": None, "flair": None, "post": None},
                                    tmp_path / "in")  # fmt: skip
    assert sequences is None and [p.name for p in inputs] == [f"{CASE}_12.tif"]
    np.testing.assert_array_equal(tifffile.imread(inputs[0]), images[11])  # channels kept in training order
    # slices without Kaggle names: each a case of its own (named by its file where that can be a case id), never
    # adjacent slices of one case (a run's largest 3-D component would keep one region over all of them)
    Image.fromarray(images[11]).save(slices / "first.png")
    Image.fromarray(images[12]).save(slices / "second (2).png")
    loose = [slices / "first.png", slices / "second (2).png"]
    inputs, _ = app.arrange(loose, {}, tmp_path / "in1")
    assert [p.name for p in inputs] == ["first_1.tif", "upload-2_1.tif"]
    from lgg import predict

    assert sorted(predict._gather(inputs)) == ["first", "upload-2"]
    # ... and never a slice of another upload's case, nor of one whose name differs only in case: refused, naming both
    Image.fromarray(images[11]).save(slices / "Scan_2.png")
    Image.fromarray(images[12]).save(slices / "scan.png")
    Image.fromarray(images[12]).save(slices / "FIRST.png")
    for pair, words in [(["Scan_2.png", "scan.png"], "scan.png and Scan_2.png"),
                        (["first.png", "FIRST.png"], "FIRST.png and first.png")]:  # fmt: skip
        with pytest.raises(app.UploadError, match=f"{words}: a slice named"):
            app.arrange([slices / name for name in pair], {}, tmp_path / f"in1-{pair[1]}")
    with pytest.raises(app.UploadError, match="small.png: 256 x 100 pixels"):
        app.arrange([slices / "small.png"], {}, tmp_path / "in2")
    Image.fromarray(images[11][..., 1]).save(slices / "grey.png")  # FLAIR alone: not the three sequences
    with pytest.raises(app.UploadError, match="grey.png: a PNG of mode L; expected 8-bit RGB"):
        app.arrange([slices / "grey.png"], {}, tmp_path / "in2b")
    # a zip of loose slices (no case folder), with Windows separators, holding a NIfTI too: all found, and the
    # folder the slices came out of (left empty) or one holding a volume is not passed on as a case without slices
    with zipfile.ZipFile(tmp_path / "loose.zip", "w") as bundle:
        for name in (f"{CASE}_12.tif", f"{CASE}_12_mask.tif"):
            bundle.write(real_data / CASE / name, f"export\\{name}")
        bundle.writestr("volumes/scan.nii.gz", b"x")
    inputs, _ = app.arrange([tmp_path / "loose.zip"], {}, tmp_path / "in2c")
    assert [path.name for path in inputs] == [CASE, "scan.nii.gz"]
    assert (tmp_path / "in2c" / "zip1" / CASE / f"{CASE}_12.tif").is_file()
    assert [index for index, _, _ in predict._gather(inputs[:1])[CASE]] == [12]
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as bundle:
        bundle.writestr("../../outside.tif", b"x")
    with pytest.raises(app.UploadError, match="points outside the archive"):
        app.arrange([tmp_path / "evil.zip"], {}, tmp_path / "in3")
    assert not (tmp_path / "outside.tif").exists()
    with pytest.raises(app.UploadError, match="notes.txt: not a NIfTI volume"):
        app.arrange([tmp_path / "notes.txt"], {}, tmp_path / "in4")
    with pytest.raises(app.UploadError, match="upload a NIfTI volume"):
        app.arrange([], {"pre": None}, tmp_path / "in5")
    # a case's slices uploaded with their masks: the masks go beside their slices (drawn in green), not as inputs
    case = [real_data / CASE / f"{CASE}_{name}.tif" for name in ("10", "10_mask", "11", "11_mask")]
    inputs, _ = app.arrange(case, {}, tmp_path / "in6")
    assert len(inputs) == 2 and not any(p.name.endswith("_mask.tif") for p in inputs)
    assert all(p.with_name(p.stem + "_mask.tif").is_file() for p in inputs)
    # two uploads that would land on one name are refused, naming both, never one silently replacing the other
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(app.UploadError, match="scan.nii.gz and scan.nii.gz: two uploads of the same name"):
        app.arrange([tmp_path / "a" / "scan.nii.gz", tmp_path / "b" / "scan.nii.gz"], {}, tmp_path / "in7")


def test_a_flair_alone_is_segmented_when_asked_to_fill_the_others(server, browser, real_data, tmp_path):
    case = "TCGA_HT_A61B_19991127"  # FLAIR only in the Kaggle set; its FLAIR spans 0-255: the NIfTI maps back exactly
    flair = tmp_path / f"{case}_flair.nii.gz"
    voxels = as_ras(kaggle_volume(real_data, case))[..., 1].astype(np.float32)
    nib.save(nib.Nifti1Image(voxels, np.diag([*SPACING, 1.0])), flair)
    rows = []
    predict.predict_paths(None, [real_data / case], tmp_path / "cli", collect=rows)
    tumor = rows[0][-1]["tumor_area_px_total"]
    assert tumor > 1000  # a real tumor, not two empty masks agreeing
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server, wait_until="domcontentloaded")
    page.wait_for_selector("#segment", timeout=60_000)
    page.click("text=Three 3-D NIfTI files, one per sequence")
    page.locator("#flair input[type=file]").set_input_files(str(flair))
    page.wait_for_selector(f"#flair :text('{flair.name}')", timeout=30_000)
    page.click("#segment")  # not ticked: refused, saying how to ask
    toast = page.wait_for_selector("[data-testid=toast-text]", timeout=120_000).inner_text()
    assert "missing --pre, --post" in toast and f"tick {app.FILL_BOX}" in toast, toast  # the page's words
    page.locator("#fill-from-flair input[type=checkbox]").check()
    page.click("#segment")
    page.wait_for_selector("#summary :text('segmented in')", timeout=120_000)
    summary = page.locator("#summary").inner_text()
    assert "Warning: pre-contrast and post-contrast filled with FLAIR" in summary, summary
    assert f"{tumor * np.prod(SPACING) / 1000:.2f} ml" in summary, summary  # the .tif slices' mask, voxel for voxel
    page.close()
