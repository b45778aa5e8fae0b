/*
 * cpu.c: how many cores this process may really use.
 *
 * sysconf(_SC_NPROCESSORS_ONLN) counts every logical CPU of the machine,
 * which over-counts three ways: hyper-threads (two logical CPUs share one
 * core's vector units, which our kernels saturate), an affinity mask
 * (taskset, a container's cpuset), and a cgroup CPU quota (a container
 * limited to 2 CPUs on a 64-CPU host still sees 64; the limit may sit on
 * any ancestor of the process's cgroup). Compute threads beyond
 * the real cores wait on each other at every barrier, so the default
 * thread count is the smallest of the three.
 */
#include "base/base.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Reads one integer from a sysfs/cgroup file; false if absent. */
static bool read_long(const char *path, long *out) {
  FILE *f = fopen(path, "r");
  if (!f) return false;
  bool ok = fscanf(f, "%ld", out) == 1;
  fclose(f);
  return ok;
}

/* CPUs' worth of one cgroup v2 cpu.max ("max 100000" or "200000 100000");
 * 0 when unlimited or absent. */
static int v2_quota(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  char q[32] = {0};
  long period = 0;
  int n = fscanf(f, "%31s %ld", q, &period);
  fclose(f);
  if (n != 2 || strcmp(q, "max") == 0 || period <= 0) return 0;
  long quota = atol(q);
  return quota > 0 ? (int)((quota + period - 1) / period) : 0;
}

static int v1_quota(const char *dir) {
  char a[4300], b[4300];
  long quota, period;
  snprintf(a, sizeof(a), "%s/cpu.cfs_quota_us", dir);
  snprintf(b, sizeof(b), "%s/cpu.cfs_period_us", dir);
  if (read_long(a, &quota) && read_long(b, &period) && quota > 0 &&
      period > 0)
    return (int)((quota + period - 1) / period);
  return 0;
}

static int min_quota(int a, int b) { return a == 0 ? b : b == 0 ? a : TN_MIN(a, b); }

/* The smallest CPU quota on the way from this process's cgroup up to the
 * root (a limit set on any ancestor applies: a systemd CPUQuota=, a
 * container's limit seen without a cgroup namespace), cgroup v2 or v1;
 * 0 when there is none. */
static int cgroup_quota(void) {
  int best = 0;
  FILE *f = fopen("/proc/self/cgroup", "r");
  char line[4096];
  while (f && fgets(line, sizeof(line), f)) {
    line[strcspn(line, "\n")] = '\0';
    /* "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1) */
    char *c1 = strchr(line, ':');
    char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c2) continue;
    *c2 = '\0';
    const char *ctrl = c1 + 1, *path = c2 + 1;
    bool v2 = line[0] == '0' && c1 == line + 1 && !*ctrl;
    char base[64];
    if (v2) {
      snprintf(base, sizeof(base), "/sys/fs/cgroup");
    } else {
      bool cpu = false;
      for (const char *t = ctrl; *t;) {
        size_t n = strcspn(t, ",");
        cpu = cpu || (n == 3 && !strncmp(t, "cpu", 3));
        t += n + (t[n] == ',');
      }
      if (!cpu) continue;
      snprintf(base, sizeof(base), "/sys/fs/cgroup/%.40s", ctrl);
      struct stat st;
      if (stat(base, &st) != 0) snprintf(base, sizeof(base), "/sys/fs/cgroup/cpu");
    }
    char dir[4200];
    snprintf(dir, sizeof(dir), "%s%s", base, path);
    for (;;) {
      char file[4300];
      if (v2) {
        snprintf(file, sizeof(file), "%s/cpu.max", dir);
        best = min_quota(best, v2_quota(file));
      } else {
        best = min_quota(best, v1_quota(dir));
      }
      char *slash = strrchr(dir, '/');
      if (!slash || (size_t)(slash - dir) < strlen(base)) break;
      *slash = '\0';
    }
  }
  if (f) fclose(f);
  /* A namespaced container sees its own limit at the root. */
  best = min_quota(best, v2_quota("/sys/fs/cgroup/cpu.max"));
  best = min_quota(best, v1_quota("/sys/fs/cgroup/cpu"));
  return best;
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
