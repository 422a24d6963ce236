"""The README is the user's entry point: every snippet in it must work as written.

* Every ```python block is executed exactly as written, in a fresh namespace, and must print
  something; the tests below then check what it claims (the quickstart learns, the grid transport
  conserves mass, dataset items are dicts with the documented keys and shapes).
* ```bash blocks install packages and train for minutes, so they are checked, not run: every
  command must be one this test knows, and parse with the real parser: ``sta ...`` with the
  package's command line (and its training configuration, ``--set`` overrides included, must
  validate), ``torchrun ...`` with torch's own launcher parser, ``pip install -e ".[extras]"``
  against the extras declared in setup.py.
* Commands quoted inline in the text (`python ...`, `bash ...`, `pip ...`) get the same checks;
  ``python benchmarks/X.py ARGS`` must parse with that script's own parser (nothing runs), and a
  ``bash`` script must pass ``bash -n``.
* The README and docs/ name only files that exist in the repository, link only to headings that
  exist, and cite no document outside it.
"""
import argparse
import ast
import contextlib
import functools
import importlib.util
import io
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _blocks(lang: str) -> list:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = _blocks("bash")


@functools.lru_cache(maxsize=None)
def _run_block(index: int):
    """Execute python block ``index`` as written; (namespace, printed text). Cached: each runs once."""
    namespace = {"__name__": f"readme_block_{index}"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    return namespace, out.getvalue()


def _block_using(marker: str) -> dict:
    matches = [i for i, block in enumerate(PYTHON_BLOCKS) if marker in block]
    assert len(matches) == 1, f"expected one README python block using {marker!r}, found {len(matches)}"
    return _run_block(matches[0])[0]


# ----------------------------------------------------------------------------------------------
# python blocks: run as written
# ----------------------------------------------------------------------------------------------

def test_readme_has_the_python_snippets_it_promises():
    assert len(PYTHON_BLOCKS) >= 3, "quickstart, dataset and latent-grid snippets"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet_runs_as_written(index, one_thread):
    _, printed = _run_block(index)
    assert printed.strip(), "every snippet shows its result"


def test_quickstart_learns(one_thread):
    ns = _block_using("SparseFlowLayer(")
    untrained = (ns["z"] - ns["target"]).square().mean().item()  # loss of not moving
    assert ns["loss"].item() < 0.7 * untrained


def test_dataset_snippet_items_are_dicts_with_the_documented_keys(one_thread):
    ns = _block_using("make_dataset(")
    item, T = ns["item"], ns["ds"].T
    assert isinstance(item, dict) and set(item) == {"x", "active", "speed", "state", "index"}
    K = len(ns["ds"].transformations)
    assert tuple(item["x"].shape) == (T + 1, 3, 28, 28) and 0 <= item["x"].min() and item["x"].max() <= 1
    assert tuple(item["active"].shape) == tuple(item["speed"].shape) == (T, K)
    assert tuple(item["state"].shape) == (T + 1, K) and isinstance(item["index"], int)


def test_latent_grid_snippet_conserves_mass_and_positivity(one_thread):
    ns = _block_using("latent_grid(")
    rho0, rho, grid = ns["rho0"], ns["rho"], ns["grid"]
    assert rho.shape == rho0.shape == grid.div.shape == ns["div"].shape == ns["curl"].shape
    torch.testing.assert_close(rho.sum(), rho0.sum(), rtol=1e-5, atol=0)
    assert rho.min() >= 0
    assert (rho - rho0).abs().max() > 1e-3 * rho0.max(), "the field must actually move the density"


# ----------------------------------------------------------------------------------------------
# bash blocks: every command parses with the real parser
# ----------------------------------------------------------------------------------------------

def _commands():
    """Every command of every bash block: argv lists (continuation lines joined, && split)."""
    commands = []
    for block in BASH_BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


COMMANDS = _commands()


def _setup_call_keyword(name: str):
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == name:
                    return ast.literal_eval(kw.value)
    raise AssertionError(f"setup.py: setup() has no literal {name}=")


def _check_sta(argv, monkeypatch):
    """Parse ``sta argv`` with the package's command line; validate, but do not run, the command."""
    import sta.cli as cli

    seen = []

    def validate(args):
        if args.command in ("train", "run"):
            cli._train_config(args)  # applies --preset/--set/--model/... and validates: ConfigError if bad
        seen.append(args.command)
        return 0

    for name in ("_train", "_evaluate", "_plot", "_run", "_demo"):
        monkeypatch.setattr(cli, name, validate)
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:  # argparse: unknown option or command
        raise AssertionError(f"`sta {' '.join(argv)}` does not parse (exit {exit_.code})") from None
    assert status == 0 and seen, f"`sta {' '.join(argv)}`: exit status {status}"


def _check_command(argv, monkeypatch):
    program, args = argv[0], argv[1:]
    if program == "sta":
        _check_sta(args, monkeypatch)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        parsed = get_args_parser().parse_args(args)
        assert parsed.module and parsed.training_script == "sta", f"{argv}: expected torchrun ... -m sta ..."
        _check_sta(parsed.training_script_args, monkeypatch)
    elif program == "pip" and args[:1] == ["install"]:
        for spec in args[1:]:
            if spec.startswith("torch=="):  # the torch the project is tested with is the one installed
                assert torch.__version__.split("+")[0] == spec.split("==")[1], (spec, torch.__version__)
            elif spec.startswith(".["):
                extras = set(spec[2:-1].split(","))
                missing = extras - set(_setup_call_keyword("extras_require"))
                assert not missing, f"setup.py declares no extras {missing}"
            else:
                assert spec in ("-e", "--no-build-isolation", "."), f"unchecked pip argument {spec!r}"
    elif argv[:3] == ["python", "-m", "pytest"]:
        rest = args[2:]
        valued = ("-m", "-k", "--backend", "--dtype")  # options whose next word is a value, not a path
        paths = [a for i, a in enumerate(rest) if not a.startswith("-") and (i == 0 or rest[i - 1] not in valued)]
        assert all((ROOT / a).exists() for a in paths), argv
    elif program == "python" and args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"{argv}: no module {args[1]}"
        if args[1] == "sta" and args[2:] != ["..."]:  # "python -m sta ..." stands for any command
            _check_sta(args[2:], monkeypatch)
    elif program == "python" and args[0].endswith(".py"):
        _check_script(args[0], args[1:], monkeypatch)
    elif program == "bash":
        assert (ROOT / args[0]).is_file(), f"{argv}: no script {args[0]}"
        subprocess.run(["bash", "-n", str(ROOT / args[0])], check=True)  # syntax only
    else:
        raise AssertionError(f"README command {argv} is not checked by tests/test_readme.py; add a check")


class _Parsed(Exception):
    """Raised instead of running a benchmark once its command line has parsed."""


def _check_script(script: str, argv, monkeypatch):
    """Parse ``python script argv`` with the script's own parser (its main(argv)); run nothing."""
    path = ROOT / script
    assert path.is_file(), f"no script {script}"
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    monkeypatch.setattr(sys, "path", [str(path.parent)] + sys.path)  # as when run as a script
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        with pytest.raises(_Parsed):
            module.main(list(argv))
    except SystemExit as exit_:
        raise AssertionError(f"`python {script} {' '.join(argv)}` does not parse (exit {exit_.code})") from None


def _inline_commands():
    """Commands quoted inline in the README's text (`python ...`, `bash ...`, `pip ...`)."""
    text = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [shlex.split(c) for c in re.findall(r"`((?:python|bash|pip) [^`]*)`", text)]


INLINE_COMMANDS = _inline_commands()


@pytest.mark.parametrize("argv", INLINE_COMMANDS, ids=[" ".join(a)[:60] for a in INLINE_COMMANDS])
def test_inline_command_is_valid(argv, monkeypatch):
    _check_command(argv, monkeypatch)


def test_bash_blocks_hold_the_commands_a_user_types():
    programs = {argv[0] for argv in COMMANDS}
    assert {"pip", "sta", "python", "torchrun"} <= programs, programs
    assert ["sta", "run"] in COMMANDS, "the main job of the set-up"


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_bash_command_is_valid(argv, monkeypatch):
    _check_command(argv, monkeypatch)


def test_sta_is_the_console_script_of_the_package():
    assert "sta=sta.cli:main" in _setup_call_keyword("entry_points")["console_scripts"]


def test_command_check_rejects_a_bad_command(monkeypatch):
    """The checks above can fail: a misspelt option, config key or extra is caught."""
    with pytest.raises(AssertionError):
        _check_command(["sta", "train", "--presett", "quick"], monkeypatch)
    with pytest.raises(Exception, match="no_such_key"):
        _check_command(["sta", "train", "--set", "model.no_such_key=1"], monkeypatch)
    with pytest.raises(AssertionError, match="extras"):
        _check_command(["pip", "install", "-e", ".[test,no_such_extra]"], monkeypatch)
    with pytest.raises(AssertionError, match="does not parse"):
        _check_command(["python", "benchmarks/bench_flow_step.py", "--device", "tpu"], monkeypatch)
    with pytest.raises(AssertionError, match="no module"):
        _check_command(["python", "-m", "sta.no_such_module"], monkeypatch)


# ----------------------------------------------------------------------------------------------
# references: files in the repository only
# ----------------------------------------------------------------------------------------------

DOC_FILES = [README] + DOCS
#: a path in one of the repository's top-level folders (not the tail of another path, such as
#: ~/.cache/sta/...); a {a,b} group is expanded
_REPO_PATH = re.compile(r"(?<![\w./~-])((?:sta|kernels|csrc|benchmarks|tests|docs)/[\w./{},-]*[\w}])")


def _expand(path: str) -> list:
    group = re.search(r"\{([^}]*)\}", path)
    if not group:
        return [path]
    return [path[:group.start()] + choice + path[group.end():] for choice in group.group(1).split(",")]


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_docs_exist_and_the_readme_links_them():
    assert {p.name for p in DOCS} >= {"maths.md", "ops.md"}
    text = README.read_text(encoding="utf-8")
    assert "(docs/maths.md)" in text and "(docs/ops.md)" in text


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_doc_cites_only_documents_in_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    assert not re.search(r"\bSPEC\b|\.\./shared|/work/", text), "cites a document outside the repository"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_doc_paths_and_links_exist(doc):
    text = doc.read_text(encoding="utf-8")
    for cited in _REPO_PATH.findall(text):
        for path in _expand(cited):
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which is not in the repository"
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file = (doc.parent / target).resolve() if target else doc
        assert file.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(file), f"{doc.name} links to {target}#{anchor}: no such heading"


def test_package_sources_cite_no_document_outside_the_repository():
    """Docstrings and comments point to docs/, not to a specification that is not shipped."""
    pattern = re.compile(r"\bSPEC(\.md| section| \d)|\.\./shared")
    offenders = []
    for folder in ("sta", "kernels", "csrc", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".h", ".cpp", ".cu", ".md", ".sh") and path.is_file():
                for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if pattern.search(line) and path.name != "test_readme.py":
                        offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
