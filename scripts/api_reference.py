"""Generate docs/api.md, the API reference, from the .proto files and their comments.

The .proto files are the reference documentation; this renders them as one Markdown page per the
usual layout (services and their RPCs, then messages and their fields, with each comment beside
what it documents). protoc (grpcio-tools) parses the files with source info, so the page is
exactly what the files say. tests/test_operations.py fails when docs/api.md drifts from them.

    python scripts/api_reference.py            # rewrite docs/api.md
    python scripts/api_reference.py --check    # exit 1 when docs/api.md is stale
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT = ROOT / "docs" / "api.md"
SOURCES = sorted((PROTO_DIR / "memory3" / "v1").glob("*.proto"))
TYPES = {v: k[5:].lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    import grpc_tools

    includes = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{includes}", "--include_source_info",
                f"--descriptor_set_out={out}", *(str(p.relative_to(PROTO_DIR)) for p in SOURCES)]
        if protoc.main(args) != 0:
            sys.exit("protoc failed on the .proto files")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _joined(*parts: str) -> str:
    return " ".join(line.strip() for part in parts for line in part.splitlines() if line.strip())


def comments(file: descriptor_pb2.FileDescriptorProto) -> tuple[dict[tuple[int, ...], str], list[str]]:
    """The comment of each element (by source path), and the file's free-standing paragraphs."""
    found, detached = {}, []
    for location in file.source_code_info.location:
        detached += [_joined(part) for part in location.leading_detached_comments if part.strip()]
        text = _joined(location.leading_comments, location.trailing_comments)
        if text:
            found[tuple(location.path)] = text
    return found, detached


def field_type(field: descriptor_pb2.FieldDescriptorProto, maps: dict[str, str]) -> str:
    if field.type_name:
        name = field.type_name.lstrip(".")
        if name in maps:
            return maps[name]
        kind = name.rsplit(".", 1)[-1]
    else:
        kind = TYPES[field.type]
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {kind}"
    return f"optional {kind}" if field.proto3_optional else kind


def render(files: descriptor_pb2.FileDescriptorSet) -> str:
    lines = ["# memory3 API reference", "",
             "Generated from `proto/memory3/v1/*.proto` by `python scripts/api_reference.py`; do not edit. "
             "The memory blob format: docs/memory-blob.md.", ""]
    for file in files.file:
        if not file.name.startswith("memory3/"):
            continue
        notes, paragraphs = comments(file)
        maps = {}
        for i, message in enumerate(file.message_type):
            for nested in message.nested_type:
                if nested.options.map_entry:
                    key, value = nested.field
                    maps[f"{file.package}.{message.name}.{nested.name}"] = (
                        f"map<{field_type(key, {})}, {field_type(value, {})}>")
        lines += [f"## {file.name}", ""]
        for paragraph in paragraphs:
            lines += [paragraph, ""]
        for s, service in enumerate(file.service):
            lines += [f"### service {service.name}", ""]
            if (6, s) in notes:
                lines += [notes[(6, s)], ""]
            lines += ["| RPC | request | response | notes |", "|---|---|---|---|"]
            for m, method in enumerate(service.method):
                request = ("stream " if method.client_streaming else "") + method.input_type.rsplit(".", 1)[-1]
                response = ("stream " if method.server_streaming else "") + method.output_type.rsplit(".", 1)[-1]
                lines.append(f"| {method.name} | {request} | {response} | {notes.get((6, s, 2, m), '')} |")
            lines.append("")
        for i, message in enumerate(file.message_type):
            lines += [f"### {message.name}", ""]
            if (4, i) in notes:
                lines += [notes[(4, i)], ""]
            if message.field:
                lines += ["| field | type | number | notes |", "|---|---|---:|---|"]
                for f, field in enumerate(message.field):
                    note = notes.get((4, i, 2, f), "").replace("|", "\\|")
                    lines.append(f"| {field.name} | {field_type(field, maps)} | {field.number} | {note} |")
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/api.md differs from the .proto files")
    args = parser.parse_args(argv)
    text = render(descriptor_set())
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit("docs/api.md is stale: run python scripts/api_reference.py")
        return
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
