"""dsv3 eval on lm-eval: stock lm-eval's numbers, offline tasks, the paper's suite, reports and records."""

import ast
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[dev]')")

from dsv3.eval import TASKS_DIR, demo_report, run_eval  # noqa: E402
from dsv3.eval.local_tasks import (  # noqa: E402
    ORDER_CHOICES,
    gsm8k_path,
    perplexity_chunks,
    word_order_items,
)
from dsv3.eval.report import (  # noqa: E402
    ReportRow,
    render_markdown,
    rows_for_results,
    suite_rows,
    write_chart,
)
from dsv3.eval.run import _check_code_execution, record_results, vllm_model_args  # noqa: E402
from dsv3.eval.suites import DEEPSEEK_V3_BASE, paper_row  # noqa: E402

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread_offline():
    # One compute thread: on a busy 2-core machine two threads are many times slower (and the stock run in a
    # subprocess uses one too, so both sides do the same arithmetic). Datasets offline like the user's runs.
    threads = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in OFFLINE}
    torch.set_num_threads(1)
    os.environ.update(OFFLINE)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Our own copy: evaluations are recorded into the folder.
    from dsv3.convert.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("eval") / "tiny-v3", "v3")


def _results_file(folder: Path) -> dict:
    (path,) = folder.glob("*/results_*.json")
    return json.loads(path.read_text())


def _samples(folder: Path, task: str) -> list[dict]:
    (path,) = folder.glob(f"*/samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dsv3_eval_matches_stock_lm_eval_on_local_tasks(tiny, tmp_path):
    from typer.testing import CliRunner

    from dsv3.cli import app

    tasks, limit = "dsv3_pydoc_ppl,dsv3_pydoc_order", "3"
    stock_out, ours_out = tmp_path / "stock", tmp_path / "ours"
    stock = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={tiny},trust_remote_code=True", "--tasks", tasks,
         "--include_path", str(TASKS_DIR), "--limit", limit,
         "--output_path", str(stock_out), "--log_samples"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **OFFLINE},
    )  # fmt: skip
    assert stock.returncode == 0, stock.stderr[-3000:]
    ours = CliRunner().invoke(
        app, ["eval", str(tiny), "--tasks", tasks, "--limit", limit, "--output", str(ours_out)]
    )
    assert ours.exit_code == 0, ours.output[-3000:]

    a, b = _results_file(stock_out), _results_file(ours_out)
    print(json.dumps(b["results"], indent=1))
    assert a["results"] == b["results"]  # every metric, bit for bit
    assert a["n-samples"] == b["n-samples"] and a["n-shot"] == b["n-shot"]
    for task in tasks.split(","):
        assert [s["resps"] for s in _samples(stock_out, task)] == [
            s["resps"] for s in _samples(ours_out, task)
        ]

    # The report lists every metric; the record beside the checkpoint follows convert/record.py's schema.
    assert "token_perplexity" in ours.output and "`dsv3_pydoc_order` (acc, 0-shot)" in ours.output
    (report,) = ours_out.glob("report_*.md")
    assert "| dsv3_pydoc_ppl |" in report.read_text()
    (entry,) = json.loads((tiny / "dsv3_record.json").read_text())["evaluations"]
    assert set(entry) == {"time", "tool", "suite", "limit", "model_args", "results"}
    assert entry["tool"] == "lm-eval 0.4.13" and entry["suite"] is None and entry["limit"] == 3
    ppl = entry["results"]["dsv3_pydoc_ppl"]
    assert ppl["bits_per_byte"] == b["results"]["dsv3_pydoc_ppl"]["bits_per_byte,none"]
    assert ppl["bits_per_byte_stderr"] is None and ppl["num_fewshot"] == 0 and ppl["samples"] == 3
    order = entry["results"]["dsv3_pydoc_order"]
    assert set(order) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_fewshot", "samples"}


def test_suite_runs_every_available_row_offline_and_says_why_for_the_others(tiny, tmp_path):
    # A fresh HF_HOME: no cached dataset, so only the local GSM8K copy (when ../shared has it) can run.
    out = tmp_path / "out"
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3.cli", "eval", str(tiny), "--suite", "deepseek-v3-base", "--limit", "2",
         "--gen-kwargs", "max_gen_toks=8", "--output", str(out), "--no-record"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = out.glob("report_*.md")
    table = [line for line in report.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table[1:]}
    assert list(rows) == [r.benchmark for r in DEEPSEEK_V3_BASE]
    for row in DEEPSEEK_V3_BASE:
        line = rows[row.benchmark]
        assert "has no task" not in line  # every task name exists in lm-eval 0.4.13
        if row.task is None:
            assert "no lm-eval task" in line
        elif row.runs_code:
            assert "skipped: runs model-written code (pass --allow-code-execution)" in line
        elif row.local_task is None:
            assert "unavailable: " in line, line
    gsm8k = rows["GSM8K"]
    try:
        gsm8k_path()
    except FileNotFoundError:
        assert "unavailable: " in gsm8k and "DSV3_GSM8K" in gsm8k
        return
    assert (
        "`dsv3_gsm8k` (exact_match strict-match, 8-shot) | 2 |" in gsm8k
        and "few-shot examples are other" in gsm8k
    )
    assert _results_file(out)["n-shot"] == {"dsv3_gsm8k": 8}
    (chart,) = out.glob("report_*.png")
    assert chart.read_bytes().startswith(PNG_MAGIC)


def test_local_gsm8k_task_reads_the_shared_test_set():
    try:
        path = gsm8k_path()
    except FileNotFoundError as err:
        pytest.skip(f"no local GSM8K test set: {err}")
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(["dsv3_gsm8k"])
    task = loaded["tasks"]["dsv3_gsm8k"]
    docs = list(task.test_docs())
    assert len(docs) == sum(1 for line in path.read_text().splitlines() if line.strip()) == 1319
    assert task.doc_to_text(docs[0]).startswith("Question: Janet") and task.doc_to_text(docs[0]).endswith(
        "Answer:"
    )
    assert task.config.num_fewshot == 5 and task.config.fewshot_split == "test"


def test_word_order_items_are_learnable_from_the_training_text_but_not_by_position():
    from dsv3.corpus import pydoc_split

    items = word_order_items()
    assert items == word_order_items() and len(items) >= 150  # deterministic for this Python
    golds = Counter(item["gold"] for item in items)
    assert max(golds.values()) / len(items) < 0.4  # always picking one position scores about chance
    for item in items:
        assert len(item["choices"]) == ORDER_CHOICES == len(set(item["choices"]))
        assert len({tuple(sorted(c.split())) for c in item["choices"]}) == 1  # same words in every choice

    # A word-bigram model counted on the training text alone (what the demo model sees) picks the true order
    # far above chance (25%).
    train = pydoc_split()[0].split()
    bigrams, unigrams = Counter(zip(train, train[1:], strict=False)), Counter(train)
    vocab = len(unigrams)

    def score(context: str, choice: str) -> float:
        words = context.split()[-1:] + choice.split()
        return sum(
            torch.log(torch.tensor((bigrams[(a, b)] + 1) / (unigrams[a] + vocab))).item()
            for a, b in zip(words, words[1:], strict=False)
        )

    correct = sum(
        max(range(ORDER_CHOICES), key=lambda i: score(it["context"], it["choices"][i])) == it["gold"]
        for it in items
    )
    print(f"bigram model: {correct}/{len(items)} = {correct / len(items):.2f} (chance 0.25)")
    assert correct / len(items) > 0.6


def test_perplexity_chunks_cover_the_heldout_text_exactly_once():
    from dsv3.corpus import pydoc_split

    chunks = perplexity_chunks()
    assert "\n\n".join(chunks) == pydoc_split()[1]
    assert all(len(c) >= 2000 for c in chunks[:-1])


def test_demo_report_evaluates_a_folder_on_the_offline_tasks(tiny, tmp_path):
    markdown, results = demo_report(tiny, tmp_path / "work", limit=3)
    assert set(results["results"]) == {"dsv3_pydoc_ppl", "dsv3_pydoc_order"}
    assert str(results["config"]["model_dtype"]) == "torch.float32"
    assert "| dsv3_pydoc_order | — |" in markdown and "token_perplexity" in markdown
    assert list((tmp_path / "work").glob("*/results_*.json"))


def test_dsv3_model_loads_fp8_and_int8_folders_with_the_same_scores_as_transformers(tmp_path):
    from dsv3.convert.quantize import quantize_int8
    from dsv3.convert.tiny import build_tiny
    from dsv3.eval.model import DSV3LM
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp8 = build_tiny(tmp_path / "fp8", "v3", fp8=True)
    int8 = tmp_path / "int8"
    quantize_int8(fp8, int8)
    context, continuation = "The model reads a sequence of tokens", " and predicts the next one."
    for folder, extra in ((fp8, {"fp8_mode": "keep"}), (int8, {})):
        lm = DSV3LM(str(folder), dtype="float32", device="cpu", **extra)
        request = Instance("loglikelihood", {}, (context, continuation), 0)
        (ours, _), *_ = lm.loglikelihood([request], disable_tqdm=True)
        ref = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, dtype=torch.float32, **extra
        )
        tok = AutoTokenizer.from_pretrained(folder)
        # Tokenized like HFLM: the pair as a whole, the continuation being what follows the context's tokens.
        ctx = tok(context)["input_ids"]
        cont = tok(context + continuation)["input_ids"][len(ctx) :]
        with torch.no_grad():
            logp = ref(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
        expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert ours == pytest.approx(expected, rel=1e-5), folder.name
        kinds = {type(m).__name__ for m in lm.model.modules()}
        assert ("FP8Linear" in kinds) == (folder == fp8)


@pytest.fixture(scope="module")
def thinking_lm(tiny):
    from dsv3.eval.model import DSV3LM

    return DSV3LM(str(tiny), dtype="float32", device="cpu", strip_thinking=True)


def test_stop_strings_count_only_after_the_reasoning_block(thinking_lm):
    from dsv3.eval.model import ThinkingAwareStop

    tok = thinking_lm.tokenizer
    prompt = tok.encode("Question: 2+2?\nAnswer: <think>\n", add_special_tokens=False)
    completion = tok.encode(
        "Let me see.\n\nTwo and two.\n\n</think>\n\nThe answer is 4.\n\nQuestion:", add_special_tokens=False
    )
    criterion = ThinkingAwareStop(tok, ["\n\n"], len(prompt), opened=[True])
    stopped_at = next(
        n for n in range(1, len(completion) + 1) if criterion(torch.tensor([prompt + completion[:n]]), None)
    )
    text = tok.decode(completion[:stopped_at])
    assert text.endswith("The answer is 4.\n\n") or text.rstrip().endswith("The answer is 4.")
    assert not criterion.thinking[0]

    # Without an open block in the prompt, the first "\n\n" stops as lm-eval would.
    plain = ThinkingAwareStop(tok, ["\n\n"], len(prompt), opened=[False])
    words = tok.encode("Four.\n\nMore", add_special_tokens=False)
    assert any(plain(torch.tensor([prompt + words[:n]]), None) for n in range(1, len(words) + 1))


def test_strip_thinking_scores_the_answer_and_blanks_an_unclosed_block(thinking_lm, monkeypatch):
    from lm_eval.api.instance import Instance

    tok = thinking_lm.tokenizer
    completions = {
        "Q1": "<think>\nhmm\n\nyes\n</think>\n\nThe answer is 4.\n\nQuestion: next",
        "Q2": "<think>\nstill thinking\n\nand more",
        "Q3": "The answer is 5.\n\nQuestion:",
    }

    def fake_generate(input_ids, max_length, **kwargs):
        rows = []
        for ids in input_ids:
            prompt = tok.decode(ids, skip_special_tokens=True)
            rows.append(ids.tolist() + tok.encode(completions[prompt.strip()[:2]], add_special_tokens=False))
        width = max(map(len, rows))
        return torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(thinking_lm.model, "generate", fake_generate)
    requests = [Instance("generate_until", {}, (q, {"until": ["\n\n"], "max_gen_toks": 32}), i) for i, q in
                enumerate(completions)]  # fmt: skip
    answers = thinking_lm.generate_until(requests, disable_tqdm=True)
    assert answers == ["The answer is 4.", "", "The answer is 5."]


def test_mtp_decoding_gives_the_answers_of_plain_greedy_decoding(thinking_lm):
    from lm_eval.api.instance import Instance

    prompts = ["The model reads a sequence of", "Numbers such as 0, 1, 2"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 12}), i) for i, p in
                enumerate(prompts)]  # fmt: skip
    thinking_lm.strip_thinking = False
    try:
        plain = thinking_lm.generate_until(requests, disable_tqdm=True)
        thinking_lm.use_mtp = True
        drafted = thinking_lm.generate_until(requests, disable_tqdm=True)
    finally:
        thinking_lm.strip_thinking, thinking_lm.use_mtp = True, False
    assert drafted == plain and all(plain)


def test_report_rows_compare_with_the_paper_and_chart_the_matches(tmp_path):
    result = {
        "results": {
            "gsm8k": {"alias": "gsm8k",
                      "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                      "exact_match,flexible-extract": 0.6, "exact_match_stderr,flexible-extract": 0.1},
            "mgsm_direct_en": {"exact_match,flexible-extract": 0.2},
            "mgsm_direct_de": {"exact_match,flexible-extract": 0.4},
        },
        "n-shot": {"gsm8k": 5, "mgsm_direct_en": 8, "mgsm_direct_de": 8},
        "n-samples": {"gsm8k": {"effective": 10}, "mgsm_direct_en": {"effective": 3},
                      "mgsm_direct_de": {"effective": 3}},
    }  # fmt: skip
    rows = rows_for_results(result, [SimpleNamespace(task_name="gsm8k")])
    strict, flexible = rows
    assert (strict.benchmark, strict.ours, strict.paper, strict.samples) == ("GSM8K", 50.0, 89.3, 10)
    assert strict.notes.startswith("5 shots here, 8 in the paper") and flexible.paper is None

    mgsm = next(r for r in DEEPSEEK_V3_BASE if r.benchmark == "MGSM")
    tasks = [SimpleNamespace(task_name=n) for n in ("mgsm_direct_en", "mgsm_direct_de")]
    planned = [SimpleNamespace(row=mgsm, objs=tasks, task="mgsm_direct", why="")]
    (row,) = suite_rows(planned, [result])
    assert row.ours == pytest.approx(30.0) and row.samples == 6 and "mean over 2 tasks" in row.notes

    chart = write_chart([strict, row], tmp_path / "chart.png", "t")
    assert chart.read_bytes().startswith(PNG_MAGIC)
    assert (
        write_chart([ReportRow("ppl", "t", "bits_per_byte,none", value=1.0)], tmp_path / "none.png") is None
    )
    markdown = render_markdown([strict, ReportRow("a|b", None, status="no lm-eval task")], "# t", chart.name)
    assert (
        "| GSM8K | 89.3 (EM, 8-shot) | 50.0 ± 10.0 | `gsm8k` (exact_match strict-match, 5-shot) | 10 |"
        in markdown
    )
    assert "| a\\|b | — | — | none |" in markdown and "![ours vs the paper](chart.png)" in markdown
    assert paper_row("dsv3_gsm8k").benchmark == "GSM8K" and paper_row("dsv3_pydoc_ppl") is None


def test_record_results_keep_filters_and_drop_non_numbers():
    result = {
        "results": {"g": {"alias": "g", "acc,none": 0.5, "acc_stderr,none": "N/A", "em,strict": 1.0}},
        "group_subtasks": {"g": ["a", "b"]},
        "n-shot": {"g": 5},
        "n-samples": {"a": {"effective": 2}, "b": {"effective": 3}},
    }
    assert record_results([result]) == {
        "g": {"acc": 0.5, "acc_stderr": None, "em,strict": 1.0, "num_fewshot": 5, "samples": 5}
    }


def test_vllm_backend_passes_our_options_to_lm_eval_vllm_model(tiny):
    args = vllm_model_args(
        "/m", tensor_parallel_size=8, data_parallel_size=2, gpu_memory_utilization=0.9, max_model_len=8192,
        dtype="bfloat16", strip_thinking=True, extra={"max_gen_toks": 1024},
    )  # fmt: skip
    assert args == {
        "pretrained": "/m", "trust_remote_code": True, "tensor_parallel_size": 8, "data_parallel_size": 2,
        "gpu_memory_utilization": 0.9, "max_model_len": 8192, "dtype": "bfloat16",
        "think_end_token": "</think>", "max_gen_toks": 1024,
    }  # fmt: skip
    # Every name is a parameter of lm-eval's VLLM model (read from its source: importing it needs vllm),
    # except gpu_memory_utilization, which it hands to vllm.LLM through **kwargs.
    import lm_eval

    source = Path(lm_eval.__file__).parent / "models" / "vllm_causallms.py"
    init = next(
        node for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )  # fmt: skip
    params = {a.arg for a in init.args.args} | {a.arg for a in init.args.kwonlyargs}
    assert set(args) - params == {"gpu_memory_utilization"} and init.args.kwarg is not None
    with pytest.raises(ValueError, match="must be at least 1"):
        vllm_model_args("/m", tensor_parallel_size=0)
    if "vllm" not in sys.modules:
        with pytest.raises(ValueError, match=r"^--backend vllm: vLLM is not installed"):
            run_eval(str(tiny), tasks=["dsv3_pydoc_ppl"], backend="vllm")


def test_code_executing_tasks_need_the_opt_in():
    task = SimpleNamespace(task_name="humaneval", config=SimpleNamespace(unsafe_code=True))
    with pytest.raises(ValueError, match="humaneval runs model-written code; pass --allow-code-execution"):
        _check_code_execution([task], allow=False)
    _check_code_execution([task], allow=True)


def test_cli_help_names_the_opt_in_and_ends_with_an_example():
    from typer.testing import CliRunner

    from dsv3.cli import app

    out = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert "--allow-code-execution" in out and "--backend" in out and "--suite" in out
    assert re.search(r"Example: dsv3 eval \S+ --tasks", out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "x", "--suite", "deepseek-v3-base"], "Error: give either --tasks or --suite"),
        (["--suite", "nope"], "Error: --suite: unknown suite 'nope' (choose from deepseek-v3-base)"),
        (
            ["--suite", "deepseek-v3-base", "--num-fewshot", "3"],
            "Error: --num-fewshot: a suite fixes the shots",
        ),
        (["--tasks", "x", "--batch-size", "big"], "Error: --batch-size: a positive integer or auto"),
        # the tiny checkpoint's tokenizer has no chat template
        (["--tasks", "x", "--apply-chat-template"], "Error: --apply-chat-template: "),
    ],
)
def test_bad_options_are_one_line_errors(tiny, args, message):
    from typer.testing import CliRunner

    from dsv3.cli import app

    result = CliRunner().invoke(app, ["eval", str(tiny), *args])
    assert result.exit_code == 1 and result.output.startswith(message) and result.output.count("\n") == 1


def test_missing_lm_eval_names_the_extra(tiny, monkeypatch):
    from typer.testing import CliRunner

    from dsv3.cli import app

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an install without the extra looks like
    result = CliRunner().invoke(app, ["eval", str(tiny), "--tasks", "dsv3_pydoc_ppl"])
    assert result.exit_code == 1
    assert result.output == "Error: lm_eval is not installed (dsv3 eval needs it): pip install 'dsv3[eval]'\n"
