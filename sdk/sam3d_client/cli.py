"""The ``sam3d-client`` command (``submit``, ``bulk``): the SDK from the shell. The server's
``sam3d-jobs`` command offers the same two commands beside its operator ones."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sam3d_client.errors import InvalidInput, ServiceError
from sam3d_client.inputs import MASK_FORMATS

EXIT_BAD_INPUT = 2


def options_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--options is not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--options must be a JSON object")
    return value


def intrinsics_arg(text: str):
    """``fx,fy,cx,cy`` or JSON (``{"fx", "fy", "cx", "cy"}``, a list, a 3x3 K)."""
    try:
        if text.lstrip().startswith(("{", "[")):
            return json.loads(text)
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "--intrinsics must be FX,FY,CX,CY (pixels) or JSON"
        ) from None


def add_input_args(cmd: argparse.ArgumentParser, prompts: bool = False) -> None:
    """IMAGE, --masks, --mask-format, --image-id, depth: the same for generate and submit
    (``prompts``: also --prompts and --boxes, for the worker's segmenter)."""
    cmd.add_argument("image", type=Path, help="JPEG, PNG or WebP image")
    if prompts:
        cmd.add_argument(
            "--prompts",
            metavar="FILE|JSON",
            help='instead of masks: [{"box": [x0,y0,x1,y1]}, {"points": [[x,y,1]]}, '
            '{"text": "mug"}], a JSON file or the JSON itself',
        )
        cmd.add_argument(
            "--boxes",
            type=Path,
            metavar="FILE",
            help="instead of masks: one box per object, x0 y0 x1 y1 per line (or a JSON list)",
        )
    cmd.add_argument(
        "--masks",
        type=Path,
        action="append",
        required=not prompts,
        metavar="FILE",
        help=".json (any JSON mask format, or a COCO file), .png (repeat for several), .npy",
    )
    cmd.add_argument("--mask-format", choices=MASK_FORMATS, help="skip format detection")
    cmd.add_argument("--image-id", type=int, help="COCO file: the image whose annotations to use")
    geometry = cmd.add_mutually_exclusive_group()
    geometry.add_argument(
        "--depth",
        type=Path,
        metavar="FILE",
        help="metric depth: 16-bit PNG in millimetres or float .npy (H,W) in metres",
    )
    geometry.add_argument(
        "--pointmap",
        type=Path,
        metavar="FILE",
        help="float .npy (H,W,3) in metres, OpenCV camera frame (+X right, +Y down, +Z fwd)",
    )
    cmd.add_argument(
        "--intrinsics",
        type=intrinsics_arg,
        metavar="FX,FY,CX,CY",
        help="the camera in pixels (needed with --depth/--pointmap)",
    )


def add_server_args(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--server",
        default=os.environ.get("SAM3D_SERVER"),
        required="SAM3D_SERVER" not in os.environ,
        metavar="URL",
        help="the service's base URL (default: $SAM3D_SERVER)",
    )
    cmd.add_argument(
        "--api-key",
        default=os.environ.get("SAM3D_API_KEY"),
        metavar="KEY",
        help="API key (default: $SAM3D_API_KEY)",
    )
    cmd.add_argument("--options", type=options_arg, default={}, help="job options as JSON")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``submit`` and ``bulk`` to a command line's subcommands."""
    sub = commands.add_parser(
        "submit",
        help="submit an image and its masks to a server",
        description="Print the job id; with --wait show progress and the outcome; with --out "
        "also download the files in the generate layout. Exit 1 when the job failed.",
    )
    add_input_args(sub, prompts=True)
    sub.add_argument("--idempotency-key", help="the same key returns the same job")
    add_server_args(sub)
    sub.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    sub.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    sub.add_argument("--out", type=Path, help="download the files here (implies --wait)")
    sub.set_defaults(run=_submit)

    bulk = commands.add_parser(
        "bulk",
        help="one job per image of a COCO file, resumable",
        description="Submit every annotated image of a COCO file (priority bulk), download "
        "each result to OUT/<image stem>/; state in OUT/.sam3d-bulk-state.json, so the same "
        "command resumes after Ctrl-C without submitting anything twice; OUT/summary.json.",
    )
    bulk.add_argument("--coco", type=Path, required=True, metavar="FILE", help="COCO file")
    bulk.add_argument(
        "--images", type=Path, required=True, metavar="DIR", help="folder of the images"
    )
    bulk.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    bulk.add_argument("--concurrency", type=int, default=4, help="jobs in flight (default 4)")
    bulk.add_argument(
        "--retry-failed", action="store_true", help="submit failed images again (new jobs)"
    )
    add_server_args(bulk)
    bulk.set_defaults(run=_bulk)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3d-client", description="Submit images and masks to a sam3d-jobs service."
    )
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _submit(args: argparse.Namespace) -> int:
    from sam3d_client.prompts import read_boxes_file, read_prompts_arg
    from sam3d_client.submit import SubmitRequest, run_submit

    given = [n for n in ("masks", "prompts", "boxes") if getattr(args, n)]
    if len(given) != 1:
        raise InvalidInput("invalid_request", "give one of --masks, --prompts and --boxes")
    prompts = None
    if args.prompts:
        prompts = read_prompts_arg(args.prompts)
    elif args.boxes:
        prompts = read_boxes_file(args.boxes)
    return run_submit(
        SubmitRequest(
            image=args.image,
            masks=args.masks or [],
            prompts=prompts,
            server=args.server,
            api_key=args.api_key,
            mask_format=args.mask_format,
            image_id=args.image_id,
            options=args.options,
            depth=args.depth,
            pointmap=args.pointmap,
            intrinsics=args.intrinsics,
            idempotency_key=args.idempotency_key,
            wait=args.wait,
            out=args.out,
            timeout=args.timeout,
        )
    )


def _bulk(args: argparse.Namespace) -> int:
    from sam3d_client.bulk import BulkConfig, run_bulk

    if args.concurrency < 1:
        raise InvalidInput("invalid_option", "--concurrency must be at least 1")
    return run_bulk(
        BulkConfig(
            coco=args.coco,
            images=args.images,
            out=args.out,
            server=args.server,
            api_key=args.api_key,
            concurrency=args.concurrency,
            options=args.options,
            retry_failed=args.retry_failed,
        )
    )


def run_command(args: argparse.Namespace, prog: str) -> int:
    """``args.run(args)``; the service's errors and unreadable files as one line on stderr and
    exit code 2 (``sam3d-jobs`` runs these commands too, under its own name)."""
    try:
        return args.run(args)
    except ServiceError as exc:
        print(f"{prog}: error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(
            f"{prog}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), "sam3d-client")


if __name__ == "__main__":
    sys.exit(main())
