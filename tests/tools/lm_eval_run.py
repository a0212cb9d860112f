"""lm-evaluation-harness's Python API (`simple_evaluate`, what its `lm_eval run` command calls) on the tasks in
tests/eval_tasks only, writing its results, per-sample records included, as JSON:

    python tests/tools/lm_eval_run.py --model local-completions --model-args '{"base_url": ...}' \
        --tasks tiny_choice --out results.json

Run it from tests/eval_tasks (the tasks' data_files are relative paths). Only this folder's tasks are indexed:
lm-eval's own index of its built-in tasks takes about 8 s to build and none of them is used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

TASKS = Path(__file__).resolve().parent.parent / "eval_tasks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="lm-eval's model type, e.g. local-completions")
    parser.add_argument("--model-args", required=True, type=json.loads, help="its arguments, a JSON object")
    parser.add_argument("--tasks", required=True, nargs="+")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per request")
    parser.add_argument("--apply-chat-template", action="store_true", help="send chats (chat models need it)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    results = simple_evaluate(
        model=args.model, model_args=args.model_args, tasks=args.tasks, batch_size=args.batch_size,
        apply_chat_template=args.apply_chat_template, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
    )
    args.out.write_text(json.dumps(results, default=handle_non_serializable, indent=1))


if __name__ == "__main__":
    main()
