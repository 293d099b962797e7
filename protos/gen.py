#!/usr/bin/env python3
"""Generate every piece of gridstor's protobuf/gRPC code: the only producer of it.

    python protos/gen.py                  regenerate in place (any working directory)
    python protos/gen.py --check          regenerate into a temp dir, compare, exit 1 on drift
    python protos/gen.py --root DIR ...   work on another checkout (the tests use a copy)

From every ``protos/gridstor/**/*.proto`` it writes, beside the proto:
``*_pb2.py`` and ``*_pb2_grpc.py`` (protoc), ``*_pb2.pyi`` and ``*_pb2_grpc.pyi``
(mypy-protobuf), and an empty ``__init__.py`` per package folder; plus the
descriptor set Envoy's grpc_json_transcoder reads, ``compose/envoy/gridstor.pb``
(``--include_imports --include_source_info``, with google/rpc/error_details.proto
so error details render as JSON); and the compose deployment's Envoy configs,
``compose/envoy/envoy.yaml`` from ``compose/gridstor.yaml`` and
``compose/envoy/envoy-replica.yaml`` from ``compose/gridstor-replica.yaml``
(services/edge/envoy.py, from the fresh descriptor set; only when that config
exists); and the table of every gateway setting, ``docs/config.md``, from the
settings' definitions (services/common/config_text.py; only when docs/ exists).
The output depends only on the protos, those configs, the settings' definitions
and the pinned tool versions, so two runs give identical bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

TOOL_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gridstor"
DESCRIPTOR = Path("compose/envoy/gridstor.pb")
CONFIG_DOC = Path("docs/config.md")
# Compose Envoy configs: (output, the gateway config it is generated from, services it serves or None = all).
ENVOY_CONFIGS = (
    (Path("compose/envoy/envoy.yaml"), Path("compose/gridstor.yaml"), None),
    (Path("compose/envoy/envoy-replica.yaml"), Path("compose/gridstor-replica.yaml"), ("auth", "meta", "maint")),
)
# Inside the Envoy container (compose mounts compose/envoy there).
ENVOY_DESCRIPTOR_REF = "/etc/envoy/gridstor.pb"
ENVOY_LISTEN_ADDRESS = "0.0.0.0"  # inside the container; the port is the config's envoy_port
ENVOY_ADMIN_PORT = 9901  # bound to 127.0.0.1 inside the container, for its health check
# Not compiled to Python, only added to the descriptor set: Envoy's transcoder renders rich error
# details as JSON only for types in its descriptor (otherwise the error reply has an empty body).
DESCRIPTOR_EXTRAS = ("google/rpc/error_details.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")
TOOLS = ("grpcio-tools", "protobuf", "googleapis-common-protos", "mypy-protobuf")
FIX_HINT = "run `make gen` (or `python protos/gen.py`) and commit the result"
_REEXEC_GUARD = "GRIDSTOR_GEN_REEXEC"


class GenError(Exception):
    """The generator cannot run; the message says what to do."""


@dataclass
class Drift:
    """How the files on disk differ from freshly generated ones (paths relative to the root)."""

    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changed or self.missing or self.stale)

    def lines(self) -> list[str]:
        """One line per drifted file."""
        out = [f"  changed  {p}" for p in self.changed]
        out += [f"  missing  {p}" for p in self.missing]
        out += [f"  stale    {p}  (no .proto produces it any more)" for p in self.stale]
        return out


def proto_sources(root: Path) -> list[str]:
    """Every proto under protos/gridstor, as include-relative POSIX paths, sorted."""
    protos = root / "protos"
    found = sorted(p.relative_to(protos).as_posix() for p in (protos / PACKAGE).rglob("*.proto"))
    if not found:
        raise GenError(f"no .proto files under {protos / PACKAGE}")
    return found


def include_dirs(root: Path) -> list[Path]:
    """protos/, googleapis-common-protos' tree (google/api, google/rpc), grpc_tools' bundled protos."""
    spec = importlib.util.find_spec("google.api.annotations_pb2")
    if spec is None or spec.origin is None:
        raise GenError("googleapis-common-protos is not installed: run `make venv`")
    googleapis = Path(spec.origin).resolve().parents[2]
    if not (googleapis / "google/api/annotations.proto").is_file():
        raise GenError(f"googleapis-common-protos ships no google/api/annotations.proto under {googleapis}")
    bundled = Path(str(resources.files("grpc_tools") / "_proto"))
    if not (bundled / "google/protobuf/descriptor.proto").is_file():
        raise GenError(f"grpc_tools' bundled protos are missing from {bundled}")
    return [root / "protos", googleapis, bundled]


def find_plugin(name: str) -> Path:
    """A protoc plugin installed beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise GenError(f"{name} not found (it comes with mypy-protobuf): run `make dev-venv`")
    return Path(found)


def run_protoc(args: list[str]) -> None:
    """Run the protoc bundled with grpcio-tools in this process; raise on failure."""
    from grpc_tools import protoc

    if protoc.main(["protoc", *args]) != 0:
        raise GenError("protoc failed (its message is above)")


def generate(root: Path, work: Path) -> dict[str, bytes]:
    """Generate everything for the tree at ``root`` inside ``work``; map root-relative paths to bytes."""
    sources = proto_sources(root)
    includes = [f"-I{d}" for d in include_dirs(root)]
    protos = root / "protos"
    py_out = work / "py"
    py_out.mkdir()
    plugins = [f"--plugin={name}={find_plugin(name)}" for name in PLUGINS]
    run_protoc(
        [
            *includes,
            *plugins,
            f"--python_out={py_out}",
            f"--grpc_python_out={py_out}",
            f"--mypy_out=quiet:{py_out}",
            f"--mypy_grpc_out=quiet:{py_out}",
            *(str(protos / s) for s in sources),
        ]
    )
    descriptor = work / "descriptor.pb"
    run_protoc(
        [
            *includes,
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={descriptor}",
            *(str(protos / s) for s in sources),
            *DESCRIPTOR_EXTRAS,
        ]
    )
    out: dict[str, bytes] = {}
    for path in sorted(py_out.rglob("*")):
        if path.is_file():
            out[(Path("protos") / path.relative_to(py_out)).as_posix()] = path.read_bytes()
    for package in {Path(s).parent for s in sources}:
        while package != Path("."):
            out[(Path("protos") / package / "__init__.py").as_posix()] = b""
            package = package.parent
    out[DESCRIPTOR.as_posix()] = descriptor.read_bytes()
    for target, source, only in ENVOY_CONFIGS:
        if (root / source).is_file():
            out[target.as_posix()] = envoy_config(root / source, descriptor, only).encode()
    if (root / CONFIG_DOC.parent).is_dir():
        out[CONFIG_DOC.as_posix()] = config_doc().encode()
    return dict(sorted(out.items()))


def _import_services() -> None:
    """Make the services package of this checkout importable (the generator runs as a plain script)."""
    if str(TOOL_ROOT) not in sys.path:
        sys.path.insert(0, str(TOOL_ROOT))


def config_doc() -> str:
    """docs/config.md: the table of every gateway setting."""
    _import_services()
    from services.common.config_text import markdown

    return markdown()


def envoy_config(source: Path, descriptor: Path, only: tuple[str, ...] | None) -> str:
    """The compose Envoy config for the gateway config ``source`` (services/edge/envoy.py does the work)."""
    _import_services()
    import yaml

    from services.common.config import build_config
    from services.common.errors import GridstorError
    from services.edge.envoy import build_envoy_config, render

    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise GenError(f"cannot read {source}: {exc}") from None
    try:
        # The file alone decides: GRIDSTOR_* overrides of the shell running this must not leak in.
        cfg = build_config(raw, env={})
        bootstrap = build_envoy_config(
            cfg,
            descriptor,
            None,
            ENVOY_ADMIN_PORT,
            listen_address=ENVOY_LISTEN_ADDRESS,
            descriptor_ref=ENVOY_DESCRIPTOR_REF,
            only=only,
        )
    except GridstorError as exc:
        raise GenError(f"{source}: {exc}") from None
    return render(bootstrap)


def existing_outputs(root: Path) -> set[str]:
    """Files on disk that this generator owns (whether or not a proto still produces them)."""
    owned: set[str] = set()
    package_dir = root / "protos" / PACKAGE
    if package_dir.is_dir():
        for path in package_dir.rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.name == "__init__.py" or path.name.endswith(GENERATED_SUFFIXES):
                owned.add(path.relative_to(root).as_posix())
    for path in (DESCRIPTOR, CONFIG_DOC, *(target for target, _, _ in ENVOY_CONFIGS)):
        if (root / path).is_file():
            owned.add(path.as_posix())
    return owned


def compare(root: Path, fresh: dict[str, bytes]) -> Drift:
    """What differs between ``fresh`` and the files under ``root``."""
    on_disk = existing_outputs(root)
    drift = Drift()
    for rel, data in fresh.items():
        if rel not in on_disk:
            drift.missing.append(rel)
        elif (root / rel).read_bytes() != data:
            drift.changed.append(rel)
    drift.stale = sorted(on_disk - fresh.keys())
    return drift


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def apply(root: Path, fresh: dict[str, bytes], drift: Drift) -> None:
    """Write changed and missing files, delete stale ones; untouched files keep their mtime."""
    for rel in drift.changed + drift.missing:
        write_atomic(root / rel, fresh[rel])
    for rel in drift.stale:
        (root / rel).unlink()


def tool_versions() -> str:
    """The generator's tool versions: drift of every file at once usually means these differ."""
    parts = []
    for name in TOOLS:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def ensure_tools() -> None:
    """Re-run under the repo's venv when this interpreter lacks grpcio-tools (e.g. a bare `python3`)."""
    if importlib.util.find_spec("grpc_tools") is not None:
        return
    venv_python = TOOL_ROOT / ".venv" / "bin" / "python"
    if venv_python.is_file() and not os.environ.get(_REEXEC_GUARD):
        print(f"gen.py: grpcio-tools missing from {sys.executable}; using {venv_python}", file=sys.stderr)
        os.environ[_REEXEC_GUARD] = "1"
        os.execv(venv_python, [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])
    raise GenError(f"grpcio-tools is not installed for {sys.executable}: run `make venv`")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="compare with a fresh generation; exit 1 on drift, change nothing"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=TOOL_ROOT,
        help="repository root holding protos/ and compose/ (default: the one this script is in)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root: Path = args.root.resolve()
    try:
        ensure_tools()
        with tempfile.TemporaryDirectory(prefix="gridstor-gen-") as tmp:
            fresh = generate(root, Path(tmp))
    except GenError as exc:
        print(f"gen.py: {exc}", file=sys.stderr)
        return 2
    drift = compare(root, fresh)
    if args.check:
        if drift:
            print(f"gen.py --check: generated files under {root} are out of date with their sources:", file=sys.stderr)
            print("\n".join(drift.lines()), file=sys.stderr)
            print(f"Fix: {FIX_HINT}.", file=sys.stderr)
            print(f"(generated with {tool_versions()})", file=sys.stderr)
            return 1
        print(f"gen.py --check: {len(fresh)} generated files are up to date")
        return 0
    apply(root, fresh, drift)
    if drift:
        print("gen.py: updated generated files:")
        print("\n".join(drift.lines()))
    else:
        print(f"gen.py: {len(fresh)} generated files already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
