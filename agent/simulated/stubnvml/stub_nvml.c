/* A stub libnvidia-ml.so.1 for simulated GPU servers (the demo, tests, benchmarks): the NVML
 * functions cohdi-agent binds, over GPUs described in a text file, so the real cffi path runs
 * without a GPU. Shipped as source in the package and compiled on first use into the cache
 * directory by agent/simulated/stubnvml/__init__.py (never into the package directory).
 *
 * $STUB_NVML_GPUS names the file; one GPU a line, tab-separated:
 *   uuid  name  bus-id(dddd:bb:dd.f)  memory-bytes  minor  processes("-" or "pid:bytes,pid:bytes")
 * Like real NVML, the list is read at init: a GPU added to the file later is seen after a re-init;
 * a GPU's processes are read live at every query.
 * $STUB_NVML_XID names a file of events, one a line: "bus-id data [event-type]" (event type in hex,
 * default 0x8 = nvmlEventTypeXidCriticalError, whose data is the Xid); nvmlEventSetWait_v2 hands them
 * out in order to a set that registered that GPU for that type (others are dropped, like NVML).
 * $STUB_NVML_LOST names a file of bus ids, one a line, read live: those GPUs answer
 * NVML_ERROR_GPU_IS_LOST (15) to per-GPU queries (not to nvmlDeviceGetPciInfo_v3), as a GPU that fell
 * off the bus does; taking a line out brings the GPU back.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;
typedef struct { char busIdLegacy[16]; unsigned int domain, bus, device, pciDeviceId, pciSubSystemId; char busId[32]; } nvmlPciInfo_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; } nvmlProcessInfo_t;
struct gpu;
typedef struct gpu *nvmlDevice_t;
typedef struct { nvmlDevice_t device; unsigned long long eventType, eventData; unsigned int gpuInstanceId, computeInstanceId; } nvmlEventData_t;
typedef struct { int registered; unsigned long long mask[64]; } *nvmlEventSet_t;

#define MAX_GPUS 64
#define MAX_PROCS 16
struct gpu {
    char uuid[96], name[96], bus[32];
    unsigned long long memory;
    unsigned int minor, domain, busno, dev, fn;
    int nprocs;
    unsigned int pids[MAX_PROCS];
    unsigned long long mems[MAX_PROCS];
};
static struct gpu gpus[MAX_GPUS];
static int ngpus = 0, initialised = 0;

static const char *messages[] = {
    [0] = "Success", [1] = "Uninitialized", [2] = "Invalid Argument", [6] = "Not Found",
    [7] = "Insufficient Size", [10] = "Timeout", [15] = "GPU is lost",
};

#define SUPPORTED_EVENTS 0xFFFFULL
#define LOST 15

/* 1 when the GPU's bus id is a line of $STUB_NVML_LOST (read at every query). */
static int lost(const struct gpu *g) {
    const char *path = getenv("STUB_NVML_LOST");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) return 0;
    char line[128];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        line[strcspn(line, " \t\r\n")] = 0;
        found = strcmp(line, g->bus) == 0;
    }
    fclose(f);
    return found;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    if (r >= 0 && r < (int)(sizeof messages / sizeof *messages) && messages[r]) return messages[r];
    return "Unknown Error";
}

static void load(void) {
    ngpus = 0;
    const char *path = getenv("STUB_NVML_GPUS");
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[1024];
    while (ngpus < MAX_GPUS && fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        struct gpu *g = &gpus[ngpus];
        memset(g, 0, sizeof *g);
        char procs[512] = "-";
        if (sscanf(line, "%95[^\t]\t%95[^\t]\t%31[^\t]\t%llu\t%u\t%511[^\n]", g->uuid, g->name, g->bus,
                   &g->memory, &g->minor, procs) < 5) continue;
        sscanf(g->bus, "%x:%x:%x.%x", &g->domain, &g->busno, &g->dev, &g->fn);
        if (strcmp(procs, "-") != 0) {
            char *save = NULL;
            for (char *tok = strtok_r(procs, ",", &save); tok && g->nprocs < MAX_PROCS; tok = strtok_r(NULL, ",", &save)) {
                sscanf(tok, "%u:%llu", &g->pids[g->nprocs], &g->mems[g->nprocs]);
                g->nprocs++;
            }
        }
        ngpus++;
    }
    fclose(f);
}

nvmlReturn_t nvmlInit_v2(void) { load(); initialised = 1; return 0; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return nvmlInit_v2(); }
nvmlReturn_t nvmlShutdown(void) { if (!initialised) return 1; initialised = 0; return 0; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) {
    if (!initialised) return 1;
    if (!n) return 2;
    *n = (unsigned int)ngpus;
    return 0;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    if (!initialised) return 1;
    if (!d || i >= (unsigned int)ngpus) return 2;
    *d = &gpus[i];
    return 0;
}

static int same_bus(const struct gpu *g, const char *bus) {
    unsigned int dom, b, dv, fn;
    if (sscanf(bus, "%x:%x:%x.%x", &dom, &b, &dv, &fn) != 4) return 0;
    return dom == g->domain && b == g->busno && dv == g->dev && fn == g->fn;
}

nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *bus, nvmlDevice_t *d) {
    if (!initialised) return 1;
    if (!bus || !d) return 2;
    for (int i = 0; i < ngpus; i++) if (same_bus(&gpus[i], bus)) { *d = &gpus[i]; return 0; }
    return 6;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *d) {
    if (!initialised) return 1;
    if (!uuid || !d) return 2;
    for (int i = 0; i < ngpus; i++) if (strcmp(gpus[i].uuid, uuid) == 0) { *d = &gpus[i]; return 0; }
    return 6;
}

static nvmlReturn_t copy(const char *src, char *dst, unsigned int len) {
    if (!dst) return 2;
    if (strlen(src) + 1 > len) return 7;
    strcpy(dst, src);
    return 0;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *buf, unsigned int len) { return d ? lost(d) ? LOST : copy(d->uuid, buf, len) : 2; }
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *buf, unsigned int len) { return d ? lost(d) ? LOST : copy(d->name, buf, len) : 2; }

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    if (!d || !m) return 2;
    if (lost(d)) return LOST;
    unsigned long long used = 0;
    for (int i = 0; i < d->nprocs; i++) used += d->mems[i];
    m->total = d->memory; m->used = used; m->free = d->memory > used ? d->memory - used : 0;
    return 0;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
    if (!d || !p) return 2;
    memset(p, 0, sizeof *p);
    p->domain = d->domain; p->bus = d->busno; p->device = d->dev;
    p->pciDeviceId = 0x20B010DE; p->pciSubSystemId = 0x153310DE;
    snprintf(p->busId, sizeof p->busId, "%08X:%02X:%02X.%X", d->domain, d->busno, d->dev, d->fn);
    snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "%04X:%02X:%02X.%X", d->domain, d->busno, d->dev, d->fn);
    return 0;
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *minor) {
    if (!d || !minor) return 2;
    if (lost(d)) return LOST;
    *minor = d->minor;
    return 0;
}

/* Processes are live, unlike the GPU list: re-read this GPU's line of the file. */
static void refresh_procs(struct gpu *d) {
    const char *path = getenv("STUB_NVML_GPUS");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) return;
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char uuid[96], procs[512] = "-";
        if (sscanf(line, "%95[^\t]\t%*[^\t]\t%*[^\t]\t%*u\t%*u\t%511[^\n]", uuid, procs) < 1) continue;
        if (strcmp(uuid, d->uuid) != 0) continue;
        d->nprocs = 0;
        if (strcmp(procs, "-") != 0) {
            char *save = NULL;
            for (char *tok = strtok_r(procs, ",", &save); tok && d->nprocs < MAX_PROCS; tok = strtok_r(NULL, ",", &save)) {
                sscanf(tok, "%u:%llu", &d->pids[d->nprocs], &d->mems[d->nprocs]);
                d->nprocs++;
            }
        }
        break;
    }
    fclose(f);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    if (!d || !count) return 2;
    if (lost(d)) return LOST;
    refresh_procs(d);
    if (d->nprocs == 0) { *count = 0; return 0; }
    if (*count < (unsigned int)d->nprocs || !infos) { *count = (unsigned int)d->nprocs; return 7; }
    for (int i = 0; i < d->nprocs; i++) {
        infos[i].pid = d->pids[i]; infos[i].usedGpuMemory = d->mems[i];
        infos[i].gpuInstanceId = 0xFFFFFFFF; infos[i].computeInstanceId = 0xFFFFFFFF;
    }
    *count = (unsigned int)d->nprocs;
    return 0;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (!set) return 2;
    *set = calloc(1, sizeof **set);
    return *set ? 0 : 999;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types) {
    if (!d || !types) return 2;
    if (lost(d)) return LOST;
    *types = SUPPORTED_EVENTS;
    return 0;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) {
    if (!d || !set) return 2;
    if (types & ~SUPPORTED_EVENTS) return 3; /* NOT_SUPPORTED */
    if (lost(d)) return LOST;
    set->mask[d - gpus] |= types;
    set->registered++;
    return 0;
}

/* Take the first "bus data [type]" line of $STUB_NVML_XID, keeping the rest. 1 if one was taken. */
static int take_event(char *bus, unsigned long long *xid, unsigned long long *type) {
    const char *path = getenv("STUB_NVML_XID");
    if (!path) return 0;
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char first[128], rest[8192] = "";
    *type = 0x8;
    int got = fgets(first, sizeof first, f) && sscanf(first, "%31s %llu %llx", bus, xid, type) >= 2;
    size_t n = got ? fread(rest, 1, sizeof rest - 1, f) : 0;
    rest[n] = 0;
    fclose(f);
    if (!got) return 0;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *w = fopen(tmp, "w");
    if (w) { fputs(rest, w); fclose(w); rename(tmp, path); }
    return 1;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    if (!set || !data) return 2;
    for (unsigned int waited = 0;; waited += 5) {
        char bus[32];
        unsigned long long xid, type;
        if (take_event(bus, &xid, &type)) {
            nvmlDevice_t d;
            if (nvmlDeviceGetHandleByPciBusId_v2(bus, &d) != 0) continue;
            if (!(set->mask[d - gpus] & type)) continue; /* not registered for it: dropped */
            memset(data, 0, sizeof *data);
            data->device = d; data->eventType = type; data->eventData = xid;
            return 0;
        }
        if (waited >= timeoutms) return 10;
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) { free(set); return 0; }
