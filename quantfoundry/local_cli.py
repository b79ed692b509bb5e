"""The CLI's local mode: `quantize` and `eval` call quantcore in this process, no service."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _bars() -> Progress:
    return Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(bar_width=24),
        TextColumn("{task.completed:>3.0f}/{task.total:<3.0f}"),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        console=err,
    )


def _figures(data: dict[str, Any]) -> Table:
    t = Table("figure", "value")
    for key, value in data.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        if not isinstance(value, dict | list):
            t.add_row(key, str(value))
    return t


def _parse_override(text: str):
    """`REGEX=BITS[:GROUP][:sym|asym]` or `REGEX=skip`."""
    from quantcore.pipeline import Override

    pattern, sep, scheme = text.rpartition("=")
    if not sep or not pattern:
        raise typer.BadParameter(f"{text!r}: use REGEX=BITS[:GROUP][:sym|asym] or REGEX=skip")
    if scheme == "skip":
        return Override(pattern, skip=True)
    parts = scheme.split(":")
    try:
        bits = int(parts[0])
        group = int(parts[1]) if len(parts) > 1 and parts[1] else None
    except ValueError:
        raise typer.BadParameter(f"{text!r}: bits and group size must be integers") from None
    sym = {"sym": True, "asym": False}.get(parts[2]) if len(parts) > 2 else None
    return Override(pattern, bits=bits, group_size=group, symmetric=sym)


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: Annotated[str, typer.Argument(help="Hub id, local directory or .gguf file.")],
        out_dir: Annotated[Path, typer.Option("--out", help="Where to write the artifact.")],
        method: Annotated[str, typer.Option(help="rtn, gptq or awq.")] = "gptq",
        bits: int = 4,
        group_size: Annotated[int, typer.Option(help="-1: per-channel.")] = 128,
        symmetric: Annotated[bool, typer.Option("--sym/--asym")] = False,
        revision: str = "main",
        samples: Annotated[int, typer.Option(help="Calibration samples.")] = 32,
        seq_len: Annotated[int, typer.Option(help="Calibration sequence length.")] = 512,
        seed: int = 0,
        forward_dtype: Annotated[
            str,
            typer.Option(
                help="Calibration matmuls of a float32 model: auto (bfloat16 where the device "
                "multiplies it natively), float32 or bfloat16."
            ),
        ] = "auto",
        calibration_file: Annotated[
            Path | None, typer.Option(help="A .txt or .jsonl calibration file.")
        ] = None,
        eval_windows: Annotated[int, typer.Option(help="Held-out windows to verify on.")] = 16,
        ignore: Annotated[list[str], typer.Option(help="Regex; repeatable.")] = ["lm_head"],  # noqa: B006
        override: Annotated[
            list[str], typer.Option(help="REGEX=BITS[:GROUP][:sym|asym] or REGEX=skip.")
        ] = [],  # noqa: B006
        fmt: Annotated[
            str, typer.Option("--format", help="pack-quantized (compressed-tensors) or gptq.")
        ] = "pack-quantized",
        device: Annotated[str | None, typer.Option(help="cpu or cuda (default: best).")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Quantize a model here and now (no service), with a progress bar per phase."""
        from quantcore.errors import QuantcoreError
        from quantcore.pipeline import Calibration, Evaluation, QuantizeRequest, run

        cal = Calibration(
            n_samples=samples, seq_len=seq_len, seed=seed, forward_dtype=forward_dtype
        )
        if calibration_file is not None:
            cal = replace(cal, dataset="file", path=str(calibration_file))
        req = QuantizeRequest(
            model_id=model,
            revision=revision,
            method=method,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            calibration=cal,
            evaluation=Evaluation(seq_len=seq_len, max_windows=eval_windows),
            ignore=tuple(ignore),
            overrides=tuple(_parse_override(o) for o in override),
            method_options={"act_order": True} if method == "gptq" else {},
        )
        with _bars() as bars:
            tasks: dict[str, TaskID] = {}

            def on_progress(p) -> None:
                if p.phase not in tasks:
                    tasks[p.phase] = bars.add_task(p.phase, total=max(p.total, 1), message="")
                bars.update(
                    tasks[p.phase],
                    completed=p.done,
                    total=max(p.total, 1),
                    message=p.message[:48],
                )

            try:
                result = run(req, out_dir, on_progress=on_progress, device=device, fmt=fmt)
            except QuantcoreError as e:
                err.print(f"[red]{type(e).__name__}:[/red] {e}")
                raise typer.Exit(2) from e
        data = {k: v for k, v in result.to_dict().items() if k != "files"}
        if as_json:
            out.print_json(json.dumps(data, default=str))
        else:
            out.print(_figures(data))
            out.print(f"artifact: {out_dir}")

    @app.command("eval")
    def eval_cmd(
        model: Annotated[str, typer.Argument(help="A model (Hub id or directory) or artifact.")],
        base: Annotated[
            str | None, typer.Option(help="Base model to compare with (KL, top-1 agreement).")
        ] = None,
        seq_len: int = 512,
        windows: Annotated[int, typer.Option(help="Held-out windows (0: all).")] = 16,
        device: Annotated[str | None, typer.Option()] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Perplexity on the held-out text, and with --base, KL and top-1 agreement."""
        import torch

        from quantcore.data.datasets import evaluation_tokens
        from quantcore.errors import QuantcoreError
        from quantcore.eval.perplexity import perplexity

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        max_windows = windows or None
        try:
            model_obj, tokenizer = _load_any(model)
            tokens = evaluation_tokens(tokenizer)
            with _bars() as bars:
                task = bars.add_task("perplexity", total=1, message=model[-40:])

                def tick(i: int, n: int) -> None:
                    bars.update(task, completed=i, total=n)

                ppl = perplexity(model_obj.to(device), tokens, seq_len, max_windows, device, tick)
                data: dict[str, Any] = {"model": model, **asdict(ppl)}
                if base is not None:
                    from quantcore.eval.agreement import agreement

                    base_obj, _ = _load_any(base)
                    task2 = bars.add_task("agreement", total=1, message=base[-40:])
                    agr = agreement(
                        base_obj.to(device), model_obj, tokens, seq_len, max_windows, device
                    )
                    bars.update(task2, completed=1)
                    data.update({"base": base, **asdict(agr)})
        except QuantcoreError as e:
            err.print(f"[red]{type(e).__name__}:[/red] {e}")
            raise typer.Exit(2) from e
        if as_json:
            out.print_json(json.dumps(data, default=str))
        else:
            out.print(_figures(data))


def _load_any(path_or_id: str):
    """A quantized artifact through our kernels, or a float model."""
    from transformers import AutoTokenizer

    from quantcore.artifact import load_quantized
    from quantcore.models.loading import load_causal_lm

    p = Path(path_or_id)
    if (p / "config.json").exists() and "quantization_config" in json.loads(
        (p / "config.json").read_text()
    ):
        return load_quantized(p), AutoTokenizer.from_pretrained(p)
    model, tokenizer, _ = load_causal_lm(path_or_id)
    return model, tokenizer
