#!/usr/bin/env bash
# A real Slurm on this machine: installs Debian's slurm-wlm and munge (root,
# or passwordless sudo), starts munged, slurmctld and slurmd for one node on
# localhost from a generated slurm.conf, submits a 4-shard ToV selection on
# stories260K with `dsel slurm --submit`, waits for it, and compares
# selection.jsonl and scores.parquet with a single-process run byte for
# byte. Stops the daemons at the end. Skips, saying why, where the packages
# cannot be installed.
#
# Usage: scripts/test-slurm.sh [path/to/dsel]   (default: target/debug/dsel, built here)
set -euo pipefail
cd "$(dirname "$0")/.."

skip() { echo "test-slurm: SKIPPED: $*" >&2; exit 0; }
fail() { echo "test-slurm: FAILED: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else skip "needs root (or passwordless sudo) to install and start Slurm"; fi
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || skip "no apt-get to install slurm-wlm and munge"
  echo "test-slurm: installing slurm-wlm and munge (Debian packages)" >&2
  if ! { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge; } >/tmp/test-slurm-apt.log 2>&1; then
    tail -5 /tmp/test-slurm-apt.log >&2
    skip "could not install slurm-wlm and munge (log: /tmp/test-slurm-apt.log)"
  fi
fi

DSEL="${1:-}"
if [ -z "$DSEL" ]; then
  ${CARGO:-cargo} build -q -p dsel-cli
  DSEL=target/debug/dsel
fi
DSEL="$(realpath "$DSEL")"
DATA_ROOT="$(realpath "${DSEL_DATA_ROOT:-../shared/data}")"
MODEL="$DATA_ROOT/models/stories260K/hf"
[ -d "$MODEL" ] || fail "no stories260K model under $DATA_ROOT/models"

T="$(mktemp -d /tmp/dsel-slurm.XXXXXX)"
chmod 755 "$T"
HOST="$(hostname -s)"
STARTED_MUNGE=""
cleanup() {
  set +e
  if [ -n "${SLURM_CONF:-}" ]; then
    scancel --quiet -u "$(id -un)" 2>/dev/null
    for pid in "$T/slurmd.pid" "$T/slurmctld.pid"; do
      [ -f "$pid" ] && $SUDO kill "$(cat "$pid")" 2>/dev/null
    done
  fi
  [ -n "$STARTED_MUNGE" ] && $SUDO pkill -x munged 2>/dev/null
  sleep 1
  if [ -z "${KEEP:-}" ]; then rm -rf "$T"; else echo "test-slurm: kept $T" >&2; fi
}
trap cleanup EXIT

# munge: the key from the package (or a new one), the daemon as its own user.
if ! pgrep -x munged >/dev/null; then
  [ -s /etc/munge/munge.key ] || $SUDO mungekey --create --force
  $SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
  $SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
  $SUDO runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
  STARTED_MUNGE=1
fi
munge -n | unmunge >/dev/null || fail "munge does not round-trip a credential"

CPUS="$(nproc)"
mkdir -p "$T/state" "$T/spool"
cat >"$T/slurm.conf" <<EOF
ClusterName=dsel-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$T/slurm.conf"
$SUDO slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start (log: $T/slurmctld.log)"
$SUDO slurmd -f "$SLURM_CONF" -N "$HOST" || fail "slurmd did not start (log: $T/slurmd.log)"
for _ in $(seq 60); do
  state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
  [ "$state" = idle ] && break
  sleep 1
done
[ "$state" = idle ] || { tail -5 "$T/slurmctld.log" "$T/slurmd.log" >&2; fail "node $HOST is '$state', not idle"; }
echo "test-slurm: Slurm $(sinfo -V | cut -d' ' -f2) up: node $HOST, $CPUS CPUs" >&2

ARGS=(--task "$PWD/data/fixtures/pipeline/toy_target.jsonl" --method tov --pool tiny --pool-limit 160
      --model "$MODEL" --budget 16 --u-size 24 --rounds 2 --unit-examples 16)
export DSEL_DATA_ROOT="$DATA_ROOT" DSEL_LOG=info

t0=$(date +%s.%N)
"$DSEL" --cache "$T/single" select "${ARGS[@]}" --out "$T/single-run" >"$T/single.out" 2>&1 \
  || { tail -20 "$T/single.out" >&2; fail "single-process select failed"; }
t1=$(date +%s.%N)
submitted="$("$DSEL" --cache "$T/shared" slurm --shards 4 --cpus-per-task "$CPUS" --dir "$T/jobs" --submit -- \
  "${ARGS[@]}" --out "$T/sharded-run")" || fail "dsel slurm --submit failed"
echo "$submitted"
merge="$(sed -n 's/.*merge=\([0-9]*\).*/\1/p' <<<"$submitted")"
[ -n "$merge" ] || fail "no merge job id in: $submitted"
for _ in $(seq 900); do
  state="$(scontrol show job "$merge" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')"
  reason="$(scontrol show job "$merge" 2>/dev/null | sed -n 's/.*Reason=\([A-Za-z_]*\).*/\1/p')"
  case "$state" in
    COMPLETED) break ;;
    FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE) break ;;
  esac
  [ "$reason" = DependencyNeverSatisfied ] && break
  sleep 1
done
t2=$(date +%s.%N)
if [ "$state" != COMPLETED ]; then
  for f in "$T"/jobs/logs/*.out; do echo "== $f"; tail -15 "$f"; done >&2
  fail "merge job $merge ended $state ${reason:-}"
fi

for i in 0 1 2 3; do
  grep -q "shard $i/4 done" "$T"/jobs/logs/shard-*_"$i".out \
    || fail "shard worker $i/4 computed no units (logs in $T/jobs/logs)"
done
for f in selection.jsonl scores.parquet; do
  cmp "$T/single-run/$f" "$T/sharded-run/$f" || fail "$f of the 4-shard Slurm run differs from the single process's"
done
printf 'test-slurm: PASSED: selection.jsonl and scores.parquet byte-identical; single process %.1fs, 4 shards on Slurm %.1fs (prepare, array, merge; submission to merge end)\n' \
  "$(awk "BEGIN{print $t1 - $t0}")" "$(awk "BEGIN{print $t2 - $t1}")"
