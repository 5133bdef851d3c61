"""The cloud-only baseline's artifact: the three slices concatenated into one "whole model" slice.

`python -m bench.whole_model --artifacts artifacts/default --out artifacts/default-whole` writes a
folder whose manifest gives the mobile (entry) tier one slice that runs all L layers and the final
classifier (ONNX graphs joined with Identity nodes along the manifest's wiring; no builder, no
torch), with the final exit's temperature and threshold 0: every sample is answered by the entry
tier after the whole model. Served by the same server code (`python -m mobile_node`), it is one
cloud-only tier: client -> Classify -> tokenise -> all layers -> answer. The slice still outputs
the first slice's hidden state so the unchanged wiring validates; it is never sent anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import link_model_files
from shared.contract.manifest import TIERS, ExitSpec, SliceSpec, load_manifest, save_manifest, sha256_file

WHOLE_FILE = "whole.onnx"


def compose_slices(artifacts: Path) -> object:
    """One ONNX model running mobile -> edge -> cloud, with the mobile slice's inputs and outputs."""
    import onnx
    from onnx import compose, helper

    manifest = load_manifest(artifacts)
    models = {s.tier: compose.add_prefix(onnx.load(str(artifacts / s.file)), f"{s.tier}/") for s in manifest.slices}
    # manifest names -> prefixed graph names, by position (as shared.serving.runner matches them)
    ins = {t: dict(zip(manifest.slice(t).inputs, (i.name for i in models[t].graph.input), strict=True)) for t in TIERS}
    outs = {t: dict(zip(manifest.slice(t).outputs, (o.name for o in models[t].graph.output), strict=True))
            for t in TIERS}
    mobile = models["mobile"].graph
    nodes = [helper.make_node("Identity", [name], [ins["mobile"][name]]) for name in manifest.slice("mobile").inputs]
    for tier, following in zip(TIERS, [*TIERS[1:], None], strict=True):
        nodes += list(models[tier].graph.node)
        for target, source in manifest.slice(tier).forwards.items() if following else ():
            value = outs[tier].get(source) or ins[tier][source]
            nodes.append(helper.make_node("Identity", [value], [ins[following][target]]))
    graph_outputs = []
    for name, output in zip(manifest.slice("mobile").outputs, mobile.output, strict=True):
        source = outs["cloud"]["logits"] if name == "logits" else outs["mobile"][name]
        nodes.append(helper.make_node("Identity", [source], [name]))
        graph_outputs.append(helper.make_value_info(name, output.type))
    graph_inputs = [helper.make_value_info(name, graph_input.type)
                    for name, graph_input in zip(manifest.slice("mobile").inputs, mobile.input, strict=True)]
    graph = helper.make_graph(
        nodes, "whole_model", graph_inputs, graph_outputs,
        initializer=[i for m in models.values() for i in m.graph.initializer])
    whole = helper.make_model(graph, opset_imports=list(models["mobile"].opset_import),
                              functions=[f for m in models.values() for f in m.functions])
    whole.ir_version = models["mobile"].ir_version
    onnx.checker.check_model(whole)
    return whole


def assemble(artifacts: Path, out: Path) -> Path:
    """Write the whole-model artifact folder `out` (reused when its manifest is newer than the source's)."""
    import onnx

    artifacts, out = Path(artifacts), Path(out)
    source_manifest = artifacts / "manifest.json"
    if (out / "manifest.json").is_file() and (out / "manifest.json").stat().st_mtime > source_manifest.stat().st_mtime:
        return out
    manifest = load_manifest(artifacts)
    link_model_files(artifacts, out, manifest)
    onnx.save(compose_slices(artifacts), str(out / WHOLE_FILE))
    mobile, final = manifest.slice("mobile"), manifest.exit("cloud")
    manifest.slices[0] = SliceSpec(
        tier="mobile", file=WHOLE_FILE, sha256=sha256_file(out / WHOLE_FILE), inputs=mobile.inputs,
        outputs=mobile.outputs, forwards=mobile.forwards, first_layer=1, last_layer=manifest.num_layers)
    manifest.exits[0] = ExitSpec(tier="mobile", layer=final.layer, temperature=final.temperature, threshold=0.0)
    save_manifest(manifest, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/default"))
    parser.add_argument("--out", type=Path, help="default: <artifacts>-whole")
    args = parser.parse_args(argv)
    out = assemble(args.artifacts, args.out or args.artifacts.with_name(args.artifacts.name + "-whole"))
    print(f"whole-model artifact: {out}")


if __name__ == "__main__":
    main()
