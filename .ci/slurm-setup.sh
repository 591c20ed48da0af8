#!/usr/bin/env bash
# Install a local Slurm (slurm-wlm: slurmctld, slurmd, client commands) and munge from Debian's packages
# for the `slurm` test tier. Safe to rerun: does nothing when the commands are already there. Needs root
# (or passwordless sudo). The daemons are NOT started here: tests/slurm/conftest.py writes a slurm.conf
# into a temp dir, starts munged/slurmctld/slurmd itself and stops them afterwards.
set -euo pipefail

need=()
for cmd in slurmctld slurmd sbatch scontrol munged mungekey; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$cmd")
done
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(ip)
if [ ${#need[@]} -eq 0 ]; then
    echo "slurm-setup: slurm-wlm, munge and iproute2 already installed"
    exit 0
fi
echo "slurm-setup: missing ${need[*]}; installing slurm-wlm munge iproute2"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian's postinst scripts try to start the services; there is no init system here, so forbid that.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 >/dev/null
echo "slurm-setup: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null)"
