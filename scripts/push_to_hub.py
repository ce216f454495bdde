"""Upload a folder written by `modeling_sparse_moe.interop.hub.save_for_hub` to the Hugging Face Hub.

    python scripts/push_to_hub.py outputs/tiny-moe --repo-id USER/tiny-moe --dry-run    # list + validate, no network
    python scripts/push_to_hub.py outputs/tiny-moe --repo-id USER/tiny-moe              # create the repo and upload
    python scripts/push_to_hub.py outputs/tiny-moe --repo-id USER/tiny-moe --private --revision dev

The token comes from HF_TOKEN or `hf auth login`. The dry run lists exactly the files an upload sends and runs the
same checks (auto_map targets exist, remote code is self-contained, card metadata parses, weights load into the
folder's own code). Any failure prints one `error:` line and exits with status 1; success is reported only after
the Hub shows the commit holding every file.
"""

import argparse
import sys

from modeling_sparse_moe.interop.hub import (
    HubFolderError,
    HubPushError,
    default_commit_message,
    push_folder_to_hub,
    validate_hub_folder,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder written by save_for_hub (config.json, *.py, safetensors, README.md)")
    parser.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing); default main")
    parser.add_argument("--commit-message", default=None, help="default: 'Upload <head> (<n> files) with sparse-moe'")
    parser.add_argument("--dry-run", action="store_true", help="list and validate only; no network, no token needed")
    parser.add_argument("--no-load", action="store_true", help="skip loading the weights (very large models)")
    return parser.parse_args(argv)


def human_size(num_bytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def dry_run(args) -> None:
    report = validate_hub_folder(args.folder, load_weights=not args.no_load, repo_id=args.repo_id)
    visibility = "private" if args.private else "the namespace's default visibility"
    print(
        f"dry run: would upload {len(report.files)} files ({human_size(report.total_bytes)}) to {args.repo_id} "
        f"(revision {args.revision or 'main'}, {visibility})"
    )
    print(f"commit message: {args.commit_message or default_commit_message(report)}")
    width = max(map(len, report.files))
    for name in report.files:
        print(f"  {name:<{width}}  {human_size(report.sizes[name]):>10}")
    loaded = "weights load with no missing or unexpected keys" if not args.no_load else "weights not loaded"
    print(
        f"checks passed: {report.architecture}; auto_map {len(report.auto_map)} entries -> "
        f"{', '.join(report.code_files)}; {len(report.weight_files)} weight files; {loaded}; card metadata parses"
    )
    print("weight files already in the repository and not listed here are deleted by the upload")
    for note in report.notes:
        print(f"note: {note}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.dry_run:
            dry_run(args)
            return 0
        result = push_folder_to_hub(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            load_weights=not args.no_load,
        )
    except (HubFolderError, HubPushError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"uploaded {len(result.files)} files to {result.repo_id}@{result.revision}: {result.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
