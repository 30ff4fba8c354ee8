"""Suites: the DeepSeek-V3 technical report's base-model table (Table 3) as lm-eval tasks, row by row.

DeepSeek scored with an internal framework, so every row names the lm-eval 0.4.13 task that stands for it, the
metric read from lm-eval's results, the shots, both scoring modes and every known difference (REFERENCE.md
§7). Rows without an lm-eval task say so and never run. Paper numbers are percentages (Pile: bits per byte).
"""

from dataclasses import dataclass

LL, GEN, BPB = "log-likelihood", "generation", "bits per byte"
NORM = "acc_norm (length-normalized); the paper does not say how it normalizes options"


@dataclass(frozen=True)
class SuiteRow:
    benchmark: str  # the paper's row
    paper_metric: str
    shots: int
    paper: float | None  # DeepSeek-V3-Base's number
    paper_scoring: str
    task: str | None  # lm-eval task, group or tag; None: lm-eval has none
    metrics: tuple[
        str, ...
    ] = ()  # keys in lm-eval's results ("metric,filter"); the first present is reported
    scoring: str = ""  # how lm-eval scores `task`
    notes: str = ""  # every known difference (prompt, shots, metric, scoring), or why there is no task
    local_task: str | None = (
        None  # our offline task for the same data, used when `task`'s data is unavailable
    )
    local_notes: str = ""  # what changes when local_task stands in
    runs_code: bool = False  # executes model-written code: only with the explicit opt-in


# fmt: off
_R = SuiteRow
DEEPSEEK_V3_BASE: tuple[SuiteRow, ...] = (
    _R("Pile-test", "BPB", 0, 0.548, BPB, None,
       notes="lm-eval has only per-subset pile_* tasks (bits_per_byte) over the Pile, which is rarely "
       "available; no aggregate Pile-test task"),
    _R("BBH", "EM", 3, 87.5, GEN, "bbh", ("exact_match,get-answer",), GEN,
       "lm-eval's bbh is the 3-shot chain-of-thought variant (bbh_cot_fewshot); answers extracted by regex"),
    _R("MMLU", "acc", 5, 87.1, LL, "mmlu", ("acc,none",), LL),
    _R("MMLU-Redux", "acc", 5, 86.2, LL, "mmlu_redux_generative", ("exact_match,default",), GEN,
       "generative (answer letter extracted from the generation) vs the paper's log-likelihood"),
    _R("MMLU-Pro", "acc", 5, 64.4, LL, "mmlu_pro", ("exact_match,custom-extract",), GEN,
       "5-shot chain of thought, answer extracted from the generation, vs the paper's log-likelihood"),
    _R("DROP", "F1", 3, 89.0, GEN, "drop", ("f1,none",), GEN),
    _R("ARC-Easy", "acc", 25, 98.9, LL, "arc_easy", ("acc_norm,none",), LL, NORM),
    _R("ARC-Challenge", "acc", 25, 95.3, LL, "arc_challenge", ("acc_norm,none",), LL, NORM),
    _R("HellaSwag", "acc", 10, 88.9, LL, "hellaswag", ("acc_norm,none",), LL, NORM),
    _R("PIQA", "acc", 0, 84.7, LL, "piqa", ("acc_norm,none",), LL, NORM),
    _R("WinoGrande", "acc", 5, 84.9, LL, "winogrande", ("acc,none",), LL,
       "lm-eval scores the sentence after the blank for each option (partial scoring)"),
    _R("RACE-Middle", "acc", 5, 67.1, LL, None,
       notes="`race` is the high-school set; RACE-Middle needs a custom task"),
    _R("RACE-High", "acc", 5, 51.3, LL, "race", ("acc,none",), LL,
       "prompt format differs: lm-eval puts the article and the earlier questions of the same article into "
       "the prompt; its few-shot examples come from the same split"),
    _R("TriviaQA", "EM", 5, 82.9, GEN, "triviaqa", ("exact_match,remove_whitespace",), GEN),
    _R("NaturalQuestions", "EM", 5, 40.0, GEN, "nq_open", ("exact_match,remove_whitespace",), GEN),
    _R("AGIEval", "acc", 0, 79.6, GEN, "agieval", ("acc,none",), LL,
       "lm-eval scores by log-likelihood (its math cloze subtasks by generation); the paper generates"),
    _R("HumanEval", "pass@1", 0, 65.2, GEN, "humaneval", ("pass_at_k,create_test", "pass@1,create_test"), GEN,
       runs_code=True),
    _R("MBPP", "pass@1", 3, 75.4, GEN, "mbpp", ("pass_at_1,none",), GEN, runs_code=True),
    _R("LiveCodeBench-Base", "pass@1", 3, 19.4, GEN, None),
    _R("CRUXEval-I", "EM", 2, 67.3, GEN, "cruxeval_input", ("pass_at_k,create_test",), GEN,
       "lm-eval samples 10 completions (temperature 0.2) and estimates pass@1", runs_code=True),
    _R("CRUXEval-O", "EM", 2, 69.8, GEN, "cruxeval_output", ("pass_at_k,create_test",), GEN,
       "lm-eval samples 10 completions (temperature 0.2) and estimates pass@1", runs_code=True),
    _R("GSM8K", "EM", 8, 89.3, GEN, "gsm8k", ("exact_match,strict-match",), GEN,
       "8 shots (lm-eval's default is 5); answer read after '####' (strict-match)",
       local_task="dsv3_gsm8k",
       local_notes="local GSM8K test set (dsv3_gsm8k): few-shot examples are other test problems, the train "
       "split is not available offline"),
    _R("MATH", "EM", 4, 61.6, GEN, "minerva_math", ("exact_match,none",), GEN,
       "Minerva prompt and answer normalization (`math` is no lm-eval task)"),
    _R("MGSM", "EM", 8, 79.8, GEN, "mgsm_direct", ("exact_match,flexible-extract",), GEN,
       "direct answers (no chain of thought); mean over the languages' scores (mgsm_direct is a tag, lm-eval "
       "reports no aggregate)"),
    _R("CMath", "EM", 3, 90.7, GEN, None),
    _R("CLUEWSC", "EM", 5, 82.7, GEN, None),
    _R("C-Eval", "acc", 5, 90.1, LL, "ceval-valid", ("acc,none",), LL,
       "validation split (the test labels are hidden)"),
    _R("CMMLU", "acc", 5, 88.8, LL, "cmmlu", ("acc,none",), LL),
    _R("CMRC", "EM", 1, 76.3, GEN, None),
    _R("C3", "acc", 0, 78.6, LL, None),
    _R("CCPM", "acc", 0, 92.0, LL, None),
    _R("MMMLU-non-English", "acc", 5, 79.4, LL, "mmmlu", ("acc,none",), LL,
       "lm-eval's mmmlu: OpenAI's 14 translated MMLU languages (English excluded)"),
)
# fmt: on

# Where each row's task lives under lm_eval/tasks (0.4.13): a suite run indexes only these folders instead of
# all ~14k task files, which saves seconds on every run. A wrong entry shows in the report as "has no task".
LM_EVAL_TASK_DIRS: dict[str, tuple[str, ...]] = {
    "bbh": ("bbh",),
    "mmlu": ("mmlu",),
    "mmlu_redux_generative": ("mmlu-redux",),
    "mmlu_pro": ("mmlu_pro",),
    "drop": ("drop",),
    "arc_easy": ("arc",),
    "arc_challenge": ("arc",),
    "hellaswag": ("hellaswag",),
    "piqa": ("piqa",),
    "winogrande": ("winogrande",),
    "race": ("race",),
    "triviaqa": ("triviaqa",),
    "nq_open": ("nq_open",),
    "agieval": ("agieval",),
    "humaneval": ("humaneval",),
    "mbpp": ("mbpp",),
    "cruxeval_input": ("cruxeval",),
    "cruxeval_output": ("cruxeval",),
    "gsm8k": ("gsm8k",),
    "minerva_math": ("benchmarks", "minerva_math"),  # the group is defined in benchmarks/, its tasks beside
    "mgsm_direct": ("mgsm",),
    "ceval-valid": ("ceval",),
    "cmmlu": ("cmmlu",),
    "mmmlu": ("openai-mmmlu",),
}

SUITES: dict[str, tuple[SuiteRow, ...]] = {"deepseek-v3-base": DEEPSEEK_V3_BASE}


def get_suite(name: str) -> tuple[SuiteRow, ...]:
    if name not in SUITES:
        raise ValueError(f"--suite: unknown suite {name!r} (choose from {', '.join(SUITES)})")
    return SUITES[name]


def paper_row(task: str, suite: str = "deepseek-v3-base") -> SuiteRow | None:
    """The suite row an lm-eval (or our local) task stands for: a plain --tasks run still shows the paper."""
    return next((r for r in SUITES[suite] if task in (r.task, r.local_task)), None)
