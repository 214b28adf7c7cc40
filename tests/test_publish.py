"""Publishing a finished run to the output folder: all of it at once, or nothing."""

import json
import os
import shutil

import pytest

from mbphot.cli import LATEST_RECORD, PUBLISHED, publish

FILES = ("catalog/multiband_catalog.parquet", "catalog/multiband_catalog.fits", "figures/flux_vs_truth.png",
         "notebooks/01_retrieve.ipynb", "notebooks/04_plots.ipynb")


def finished_run(output, tag):
    run_dir = output / "runs" / tag
    for relative in FILES:
        (run_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / relative).write_text(f"{tag}: {relative}")
    return run_dir


def latest_outputs(output) -> dict:
    """What a reader of the fixed places sees."""
    seen = {LATEST_RECORD: json.loads((output / LATEST_RECORD).read_text())["run_tag"]}
    for name in PUBLISHED:
        for path in sorted((output / name).rglob("*")):
            seen[str(path.relative_to(output))] = path.read_text()
    return seen


def published_by(tag) -> dict:
    return {LATEST_RECORD: tag, **{relative: f"{tag}: {relative}" for relative in FILES}}


def test_publishing_switches_every_output_to_the_new_run(tmp_path):
    output = tmp_path / "output"
    publish(finished_run(output, "first"), output, {"run_tag": "first"})
    assert latest_outputs(output) == published_by("first")
    publish(finished_run(output, "second"), output, {"run_tag": "second"})
    assert latest_outputs(output) == published_by("second")
    assert len(list((output / "published").iterdir())) == 1, "the replaced set is removed"


def test_an_older_versions_plain_output_folders_become_links(tmp_path):
    output = tmp_path / "output"
    (output / "catalog").mkdir(parents=True)
    (output / "catalog" / "multiband_catalog.parquet").write_text("old")
    (output / LATEST_RECORD).write_text('{"run_tag": "old"}')
    publish(finished_run(output, "new"), output, {"run_tag": "new"})
    assert latest_outputs(output) == published_by("new")
    assert (output / "catalog").is_symlink() and (output / LATEST_RECORD).is_symlink()


def test_a_fault_at_any_step_of_publishing_leaves_the_previous_outputs_whole(tmp_path, monkeypatch):
    """Every copy, rename and link switch fails in turn; readers see the first run whole each time.

    A publisher that copied straight into ``output/catalog`` etc. fails this at its second copy.
    """
    output = tmp_path / "output"
    publish(finished_run(output, "first"), output, {"run_tag": "first"})
    second = finished_run(output, "second")
    real = {"copyfile": shutil.copyfile, "replace": os.replace, "rename": os.rename}

    def failing_at(step):
        calls = [0]

        def wrap(name):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == step:
                    raise OSError(28, "No space left on device (injected)")
                return real[name](*args, **kwargs)
            return call

        monkeypatch.setattr(shutil, "copyfile", wrap("copyfile"))
        monkeypatch.setattr(os, "replace", wrap("replace"))
        monkeypatch.setattr(os, "rename", wrap("rename"))

    step = 1
    while True:
        failing_at(step)
        try:
            publish(second, output, {"run_tag": "second"})
        except OSError as error:
            assert "injected" in str(error)
            assert latest_outputs(output) == published_by("first"), f"fault at step {step}"
            step += 1
            continue
        break
    assert step > len(FILES) + 2, "every file copy and both renames were faulted"
    assert latest_outputs(output) == published_by("second")
    assert [path.name.startswith(".") for path in (output / "published").iterdir()] == [False], (
        "half-copied sets left by the faults are removed"
    )


@pytest.mark.parametrize("name", [*PUBLISHED, LATEST_RECORD])
def test_the_fixed_places_all_go_through_one_link(tmp_path, name):
    output = tmp_path / "output"
    publish(finished_run(output, "first"), output, {"run_tag": "first"})
    assert os.readlink(output / name) == os.path.join("latest", name)
