"""``mbphot notebooks DEST`` and where ``mbphot run`` finds the notebooks."""

from mbphot.cli import DEFAULT_NOTEBOOK_DIR, NOTEBOOKS, main


def test_notebooks_are_found():
    for name in NOTEBOOKS:
        assert (DEFAULT_NOTEBOOK_DIR / f"{name}.md").is_file()


def test_notebooks_command_copies_the_four_notebooks(tmp_path, capsys):
    destination = tmp_path / "mine"
    assert main(["notebooks", str(destination)]) == 0
    assert sorted(path.name for path in destination.iterdir()) == [f"{name}.md" for name in NOTEBOOKS]
    assert capsys.readouterr().out.splitlines() == [str(destination / f"{name}.md") for name in NOTEBOOKS]
    assert (destination / "04_plots.md").read_text() == (DEFAULT_NOTEBOOK_DIR / "04_plots.md").read_text()


def test_notebooks_command_never_overwrites_without_force(tmp_path, capsys):
    (tmp_path / "01_retrieve.md").write_text("my edits")
    assert main(["notebooks", str(tmp_path)]) == 1
    assert "already exist; use --force" in capsys.readouterr().err
    assert (tmp_path / "01_retrieve.md").read_text() == "my edits"
    assert main(["notebooks", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "01_retrieve.md").read_text() != "my edits"
