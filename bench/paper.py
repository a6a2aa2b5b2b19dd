"""The paper's table on SmolLM2-135M: alignment subsets x alignment-stage defenses, seeds on their
own pool draws, as a sweep that survives sessions.

    python bench/paper.py --source ../shared/data --out runs/paper [--parts table,lens,ablations,bds,fig1]

Each seed s builds its own data folder (`data/prepare.py --seed s`: its own pool, planted rows,
training files and retain rows; the evaluation prompts are the same for every seed and none is
one the judge was fitted on), ranks its pool once per selector, and runs each cell
select (cut to k) -> align (the defense, align seed s) -> eval before the attack -> attack (the
calibrated attack, fine-tune seed s) -> eval, in <out>/s<seed>/<cell>.

The parts, in this order (a sweep stopped early has answered the first ones):
  table      selectors full, random, loss, pharmacist x defenses sft, tvaccine, repnoise (its logit
             lens on REPNOISE_LENS layers spread over the depth: defenses.lens_layers);
  lens       Pharmacist with RepNoise whose lens reads every layer, as the reference (repnoise-lens-all),
             beside the table's cell: what the cheaper lens changes after the attack;
  ablations  SFT with Pharmacist at λ = 0 (no harmful term) and an oracle that keeps a random k of
             the truly clean rows (pharmacist.oracle_select: denoising alone);
  bds        Full+SFT and Pharmacist+SFT attacked with the tuning-stage defense BDS;
  bds-safe0  the same attacked with BDS's per-sample weights alone, its alignment loss off
             (--defense-bds-safe-weight 0), from the bds part's aligned models where on disk: what
             the weights do without the refusals BDS trains beside the user's data;
  fig1       Pharmacist and Random with SFT at k in --ks (the table gives k = --keep);
  strength   Random's subset with every alignment defense (sft, vaccine, repnoise, booster, tvaccine) attacked
             at a weaker and a stronger learning rate than the calibrated attack (STRENGTHS), and vaccine and
             booster at the calibrated one (the other defenses have it in the table); a cell at another
             strength starts from the aligned model of its calibrated cell where that is on disk. The
             judge's labels at every defense and strength (data/judge/README.md), and how each defense
             holds as the attack grows;
  safety     on a pool where safety-criticality shows (data/prepare.py --attack-categories SAFETY:
             the harmful set and the attack's harmful rows from those harm categories, half the
             pool's refusals on them; held-out wording), SFT with Pharmacist at λ = 1 and λ = 0 and
             Random, keeping --safety-keep rows (half the clean refusals), in <out>/s<seed>/safety.
Every finished cell appends one line to results/paper/table.jsonl and copies its configs,
summaries, results and generations to results/paper/runs/s<seed>/<cell>/ (and before/ for the
evaluation before the attack); a cell already in table.jsonl is skipped, so a rerun, in the same
session or a later one, does only what is missing, and an align or attack stage stopped midway
continues from its last checkpoint (`train.py --resume`; its time is the sum of its sittings).
`bench/paper_report.py` makes the tables.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reproduce import ATTACK, SMALL_RETAIN, RunFailed, Sweep, build_data, export  # noqa: E402

SAFETY = ("cyber", "chem_bio_drugs", "weapons_violence")  # the safety part's attack categories
SAFETY_FLAGS = ["--held-out-wording", "--attack-categories", ",".join(SAFETY), "--harmful-size", "32"]
PARTS = ("table", "lens", "ablations", "bds", "bds-safe0", "fig1", "strength", "safety")
STRENGTHS = ("5e-5", "8e-4")  # the strength part's attack learning rates: a quarter and 4x the calibrated ATTACK["lr"]
STRENGTH_DEFENSES = ("repnoise", "tvaccine", "sft", "vaccine", "booster")  # in the order they run
COMPILED = ("sft",)  # the defenses whose align stage runs compiled blocks (defenses.COMPILABLE, bds aside)
REPNOISE_LENS = 6  # the RepNoise column reads 6 of the 30 layers' logit lens (bench/lens.py, docs/DESIGN.md)
VARIANTS = {  # a column's name -> (train.py's --align-defense, its defense flags)
    "repnoise": ("repnoise", ["--defense-repnoise-lens-layers", str(REPNOISE_LENS)]),
    "repnoise-lens-all": ("repnoise", ["--defense-repnoise-lens-layers", "0"])}  # the lens part: every layer
ATTACK_DEFENSES = {  # a cell's tuning-stage defense at the attack -> its train.py flags ("": none)
    "": ["--finetune-compile"],
    "bds": ["--finetune-defense", "bds"],
    "bds-safe0": ["--finetune-defense", "bds", "--defense-bds-safe-weight", "0"]}  # the weights alone
RESULTS = ROOT / "results" / "paper"


class Table:
    """results/paper/table.jsonl: one line per finished cell, appended under a lock."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        lines = path.read_text().splitlines() if path.is_file() else []
        self.done = {json.loads(line)["run"] for line in lines if line.strip()}

    def add(self, row: dict):
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.done.add(row["run"])


def commit() -> str:
    """The code a cell ran: HEAD of this checkout, "+dirty" when a tracked file outside results/
    differs from it (the sweep's own table.jsonl there changes with every cell it finishes)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                           capture_output=True, text=True).stdout
    return (head or "unknown") + ("+dirty" if dirty.strip() else "")


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def numbers(after: dict, before: dict) -> dict:
    """A cell's judged and measured numbers from its evaluations after and before the attack
    (their results.json): what `evaluate.py rescore` rewrites."""
    corrected = after.get("harmful_corrected") or {}
    return dict(
        harmful_after=after.get("harmful_score"), harmful_after_corrected=corrected.get("rate"),
        harmful_after_low=corrected.get("low"), harmful_after_high=corrected.get("high"),
        harmful_before=before.get("harmful_score"), judge=after.get("judge"),
        refusal_after=after.get("outcomes", {}).get("refusal"), refusal_before=before.get("outcomes", {}).get("refusal"),
        degenerate_after=after.get("outcomes", {}).get("degenerate"),
        over_refusal_before=before.get("over_refusal"), over_refusal_after=after.get("over_refusal"),
        broken_benign_before=before.get("benign_outcomes", {}).get("degenerate"),
        broken_benign_after=after.get("benign_outcomes", {}).get("degenerate"),
        sst2_after=after.get("accuracy", {}).get("sst2"), sst2_before=before.get("accuracy", {}).get("sst2"),
        harmful_loss_after=after.get("harmful_loss"), harmful_loss_before=before.get("harmful_loss"))


def row(cell: dict, run: Path, results: Path) -> dict:
    """A finished cell's line: what it is, its pool draw, and its numbers before and after."""
    after, before = read(run / "eval" / "results.json"), read(run.parent / f"before_{run.name}" / "eval" / "results.json")
    align, attack = read(run / "align" / "summary.json"), read(run / "finetune" / "summary.json")
    manifest = read(Path(align.get("data", "")) / "manifest.json")
    return dict(
        cell, commit=commit(), pool_seed=manifest.get("seed"), eval_seed=manifest.get("eval_seed"),
        **numbers(after, before),
        n_align=align.get("n_align"), n_retain=align.get("n_retain"), align_tokens=align.get("tokens"),
        select_time_s=align.get("select_time_s"), align_time_s=align.get("align_time_s"),
        attack_time_s=attack.get("wall_time_s"), eval_time_s=after.get("eval_time_s"),
        attack_harmful_share=attack["n_harmful"] / attack["n_train"] if attack.get("n_train") else None,
        bds_harmful_share=attack.get("bds_harmful_share"),  # BDS's weight mass on those rows (the bds part)
        generations=str((results / "generations.jsonl").relative_to(ROOT)),
        generations_before=str((results / "before" / "generations.jsonl").relative_to(ROOT)))


class PaperSweep(Sweep):
    """The runs of one seed: reproduce.Sweep's stages, each finished cell recorded in the table."""

    def __init__(self, out: Path, data: Path, seed: int, table: Table, jobs: int, keep: int = 160, pool: str = ""):
        super().__init__(out, data, ["--align-epochs", "2"], [], keep=keep, jobs=jobs)
        self.seed, self.table, self.before, self.pool_kind = seed, table, True, pool  # "" or "safety"
        self.resume = True  # a stage the last sitting stopped continues from its checkpoint (its time: the sum)
        self.attack(ATTACK["lr"], ATTACK["epochs"], ATTACK["p"])

    def cell(self, c: "Cell"):
        """Hands one cell to the workers unless the table holds it (its run: s<seed>/<name>). A cell
        attacked at another learning rate (c.lr) starts from its calibrated cell's aligned model
        where that run folder holds one (the same subset, defense and seed: the same model), and so
        does a BDS variant other than "bds" from the bds cell's."""
        name = c.name(self.pool_kind)
        key = f"s{self.seed}/{name}"
        if key in self.table.done:
            return
        selection = self.ranking(c.ranking or c.selector)
        info = dict(run=key, part=c.part, selector=c.ranking or c.selector, defense=c.defense + (f"+{c.bds}" if c.bds else ""),
                    k=c.k, seed=self.seed, lam=0.0 if c.ranking == "pharmacist-lam0" else 1.0 if c.selector == "pharmacist" else None,
                    attack_lr=c.lr or ATTACK["lr"], **({"pool": self.pool_kind} if self.pool_kind else {}))
        base, flags = VARIANTS.get(c.defense, (c.defense, []))
        align = ["--align-seed", str(self.seed), *(["--align-compile"] if c.defense in COMPILED else []), *flags]
        attack = ["--finetune-seed", str(self.seed), *ATTACK_DEFENSES[c.bds],
                  *(["--finetune-lr", c.lr] if c.lr else [])]  # after the sweep's own --finetune-lr: this one counts
        reference = self.out / c._replace(lr="", bds=c.bds and "bds").name(self.pool_kind)
        varied = c.lr or c.bds not in ("", "bds")  # only the attack differs from the reference cell
        align_from = reference if varied and (reference / "align" / "model").is_dir() else None
        self.run(name, selection, c.k, base, attack=attack, align=align, info=info, align_from=align_from)

    def config(self, name: str, selection: Path, k: int, defense: str, info: dict | None = None, **kwargs) -> Path:
        t0 = time.time()
        run = super().config(name, selection, k, defense, **kwargs)
        if info is not None:
            results = RESULTS / "runs" / f"s{self.seed}" / name
            export(run, results.parent)
            export(run.parent / f"before_{name}", results.parent)
            shutil.rmtree(results / "before", ignore_errors=True)  # a cell redone after a kill
            os.replace(results.parent / f"before_{name}", results / "before")
            self.table.add(dict(row(info, run, results), wall_time_s=round(time.time() - t0, 1)))
        return run

    def ranking(self, selector: str) -> Path:
        """The select/ run of a selector (pharmacist-lam0: Pharmacist with λ = 0), made on first use."""
        if selector not in self.rankings:
            flags = ["--select-lam", "0"] if selector == "pharmacist-lam0" else []
            name = "pharmacist" if selector == "pharmacist-lam0" else selector
            run = self.out / f"select_{selector}"
            self.train(run, "select", "--select-selector", name, "--select-keep", str(self.k_of(name)),
                       "--select-seed", str(self.seed), *flags, alone=True)
            self.rankings[selector] = run
        return self.rankings[selector]


class Cell(NamedTuple):
    """One cell of the sweep: which part it belongs to, the subset (a selector's ranking cut to k),
    the alignment defense, the defense at the attack (ATTACK_DEFENSES: "" none, "bds", "bds-safe0")
    and the attack's learning rate ("": ATTACK's)."""
    part: str
    selector: str
    defense: str
    k: int
    ranking: str | None = None  # a ranking other than the selector's own (pharmacist-lam0)
    bds: str = ""
    lr: str = ""

    def name(self, pool: str = "") -> str:
        return cell_name(self.selector, self.defense, self.k, self.ranking, self.bds, pool, self.lr)


def cell_name(selector: str, defense: str, k: int, ranking: str | None = None, bds: str = "", pool: str = "",
              lr: str = "") -> str:
    return f"{pool + '_' if pool else ''}{ranking or selector}_{defense}{'+' + bds if bds else ''}_k{k}{'_lr' + lr if lr else ''}"


def cells(parts: list[str], defenses: list[str], keep: int, ks: list[int], safety_keep: int = 80) -> list[Cell]:
    """Every cell of the parts, in the order the sweep runs them."""
    out = [Cell("table", s, d, 400 if s == "full" else keep) for d in defenses for s in ("full", "random", "loss", "pharmacist")]
    out += [Cell("lens", "pharmacist", "repnoise-lens-all", keep)]
    out += [Cell("ablations", "pharmacist", "sft", keep, "pharmacist-lam0"), Cell("ablations", "oracle", "sft", keep)]
    out += [Cell(part, s, "sft", 400 if s == "full" else keep, bds=part) for part in ("bds", "bds-safe0")
            for s in ("full", "pharmacist")]
    out += [Cell("fig1", s, "sft", k) for k in ks for s in ("pharmacist", "random")]
    out += [Cell("strength", "random", d, keep, lr=lr) for d in STRENGTH_DEFENSES
            for lr in (("",) if d in ("vaccine", "booster") else ()) + STRENGTHS]
    out += [Cell("safety", s, "sft", safety_keep, r) for s, r in (("pharmacist", None), ("pharmacist", "pharmacist-lam0"),
                                                                  ("random", None))]
    return [c for c in out if c.part in parts]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the public data folder data/prepare.py reads")
    p.add_argument("--out", default="runs/paper")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parts", default="table,lens,ablations,bds,fig1", help=f"a comma list of {', '.join(PARTS)}")
    p.add_argument("--defenses", default="sft,tvaccine,repnoise", help="the table's columns, in the order they run")
    p.add_argument("--keep", type=int, default=160)
    p.add_argument("--ks", default="80,240,400", help="the other k of fig1")
    p.add_argument("--fig1-seeds", default="0,1", help="seeds of the fig1 part")
    p.add_argument("--lens-seeds", default="0", help="seeds of the lens part")
    p.add_argument("--strength-seeds", default="0", help="seeds of the strength part")
    p.add_argument("--safety-keep", type=int, default=80, help="rows the safety part keeps (of 160 clean refusals)")
    p.add_argument("--jobs", type=int, default=2, help="cells at a time, each with cpu_count / jobs threads")
    args = p.parse_args(argv)
    seeds, parts = [int(s) for s in args.seeds.split(",")], args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown or args.jobs < 1:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}" if unknown else "--jobs must be at least 1")
    table, out = Table(RESULTS / "table.jsonl"), Path(args.out).resolve()
    todo = cells(parts, args.defenses.split(","), args.keep, [int(k) for k in args.ks.split(",")], args.safety_keep)
    started, failed = time.time(), []
    for part in PARTS:  # each part over every seed before the next part
        only = {"fig1": args.fig1_seeds, "lens": args.lens_seeds, "strength": args.strength_seeds}.get(part)
        for seed in seeds if only is None else [s for s in seeds if str(s) in only.split(",")]:
            pool = "safety" if part == "safety" else ""
            mine = [c for c in todo if c.part == part and f"s{seed}/{c.name(pool)}" not in table.done]
            if not mine:  # every cell of this part and seed is in the table: nothing to build or rank
                continue
            root = out / f"s{seed}" / pool if pool else out / f"s{seed}"
            data = build_data(args.source, root / "data", root / "sweep.log", "--seed", str(seed), "--p", ATTACK["p"],
                              "--retain-answers", "self", "--retain-size", str(SMALL_RETAIN),
                              *(SAFETY_FLAGS if pool else []))
            sweep = PaperSweep(root, data, seed, table, args.jobs, args.safety_keep if pool else args.keep, pool)
            for c in mine:  # every ranking first, alone on the machine (its time counts)
                try:
                    sweep.ranking(c.ranking or c.selector)
                except RunFailed as e:
                    print(e, flush=True)
            for c in mine:
                if c.lr and c._replace(lr="") in mine:  # its calibrated cell is running: its aligned model first
                    sweep.wait()
                try:
                    sweep.cell(c)
                except RunFailed as e:  # a ranking failed: its cells are skipped, the sweep goes on
                    print(e, flush=True)
                    failed.append(f"s{seed}/{c.ranking or c.selector}")
            sweep.wait()
            failed += [f"s{seed}/{name}" for name in sweep.failed]
    print(f"{len(table.done)} cells in {table.path}; this call {time.time() - started:.0f} s")
    if failed:
        sys.exit(f"these cells failed (see {out}/s*/logs): {', '.join(failed)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
