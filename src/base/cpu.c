/*
 * cpu.c: how many cores this process may really use.
 *
 * sysconf(_SC_NPROCESSORS_ONLN) counts every logical CPU of the machine,
 * which over-counts three ways: hyper-threads (two logical CPUs share one
 * core's vector units, which our kernels saturate), an affinity mask
 * (taskset, a container's cpuset), and a cgroup CPU quota (a container
 * limited to 2 CPUs on a 64-CPU host still sees 64). Compute threads beyond
 * the real cores wait on each other at every barrier, so the default
 * thread count is the smallest of the three.
 */
#include "base/base.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Reads one integer from a sysfs/cgroup file; false if absent. */
static bool read_long(const char *path, long *out) {
  FILE *f = fopen(path, "r");
  if (!f) return false;
  bool ok = fscanf(f, "%ld", out) == 1;
  fclose(f);
  return ok;
}

/* CPUs' worth of quota from cgroup v2 cpu.max ("max 100000" or
 * "200000 100000") or v1 cfs_quota_us / cfs_period_us; 0 when unlimited. */
static int cgroup_quota(void) {
  FILE *f = fopen("/sys/fs/cgroup/cpu.max", "r");
  if (f) {
    char q[32] = {0};
    long period = 0;
    int n = fscanf(f, "%31s %ld", q, &period);
    fclose(f);
    if (n == 2 && strcmp(q, "max") != 0 && period > 0) {
      long quota = atol(q);
      if (quota > 0) return (int)((quota + period - 1) / period);
    }
    return 0;
  }
  long quota, period;
  if (read_long("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", &quota) &&
      read_long("/sys/fs/cgroup/cpu/cpu.cfs_period_us", &period) &&
      quota > 0 && period > 0)
    return (int)((quota + period - 1) / period);
  return 0;
}

static int cap_by_quota(int n) {
  int q = cgroup_quota();
  if (q > 0 && q < n) n = q;
  return n > 0 ? n : 1;
}

int tn_cpu_count_logical(void) {
  cpu_set_t set;
  int n = 0;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) {
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    n = c > 0 ? (int)c : 1;
  }
  return cap_by_quota(n);
}

int tn_cpu_count(void) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0)
    return tn_cpu_count_logical();
  /* Distinct (package, core) pairs among the CPUs we may run on. */
  enum { MAX_CORES = 1024 };
  long seen_pkg[MAX_CORES], seen_core[MAX_CORES];
  int n_cores = 0, n_logical = 0;
  bool topo_ok = true;
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
    if (!CPU_ISSET(cpu, &set)) continue;
    n_logical++;
    char path[128];
    long core, pkg;
    snprintf(path, sizeof(path),
             "/sys/devices/system/cpu/cpu%d/topology/core_id", cpu);
    if (!read_long(path, &core)) topo_ok = false;
    snprintf(path, sizeof(path),
             "/sys/devices/system/cpu/cpu%d/topology/physical_package_id",
             cpu);
    if (!read_long(path, &pkg)) topo_ok = false;
    if (!topo_ok) continue;
    bool dup = false;
    for (int i = 0; i < n_cores && !dup; i++)
      dup = seen_core[i] == core && seen_pkg[i] == pkg;
    if (!dup && n_cores < MAX_CORES) {
      seen_core[n_cores] = core;
      seen_pkg[n_cores] = pkg;
      n_cores++;
    }
  }
  int n = topo_ok && n_cores > 0 ? n_cores : n_logical;
  return cap_by_quota(n);
}
