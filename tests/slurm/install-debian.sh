#!/usr/bin/env bash
# Install a one-node SLURM (with slurmdbd + MariaDB so sacct works) from Debian for
# tests/test_slurm.py. Services are not started by apt (policy-rc.d): the test starts
# its own daemons on free ports and stops exactly those.
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=0
for binary in slurmctld slurmd sbatch sacct munged slurmdbd mariadbd; do
  command -v "$binary" >/dev/null 2>&1 || missing=1
done
[ "$missing" = 0 ] && exit 0  # already installed
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
