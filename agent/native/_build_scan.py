"""cffi API-mode builder of `agent.native._scan`: one C call scans `<root>/bus/pci/devices` and
fills an array of structs — every function's ids, class, revision, NUMA node, link, driver and
IOMMU group — with per-function errors reported, not swallowed. Built by the package build
(`cffi_modules` in setup.py)."""

from __future__ import annotations

from cffi import FFI

STRUCT = """
typedef struct {
    char address[16];
    unsigned int vendor, device, class_code, subsystem_vendor, subsystem_device, revision;
    int numa_node;
    char link_speed[32];
    int link_width;
    char driver[64];
    int iommu_group;
    int error;              /* errno of the first failed read, 0 when all were read */
    char error_attr[32];    /* the attribute that failed */
} pci_function;
"""

CDEF = (
    STRUCT
    + """
int pci_scan(const char *sysfs_root, pci_function *out, int capacity, int *count,
             char *err, int errlen);
"""
)

SOURCE_HEAD = r"""
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
"""

SOURCE = (
    SOURCE_HEAD
    + STRUCT
    + r"""
/* Read a small sysfs attribute into buf (NUL-terminated, trailing newline cut). 0 or errno. */
static int read_attr(int dirfd, const char *name, char *buf, size_t len) {
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno;
    ssize_t n = read(fd, buf, len - 1);
    int saved = errno;
    close(fd);
    if (n < 0) return saved;
    buf[n] = 0;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ')) buf[--n] = 0;
    return 0;
}

static void note(pci_function *f, int e, const char *attr) {
    if (f->error == 0) {
        f->error = e;
        snprintf(f->error_attr, sizeof f->error_attr, "%s", attr);
    }
}

static unsigned int hex_attr(int dirfd, pci_function *f, const char *name, int required) {
    char buf[32];
    int e = read_attr(dirfd, name, buf, sizeof buf);
    if (e) {
        if (required || e != ENOENT) note(f, e, name);
        return 0;
    }
    return (unsigned int)strtoul(buf, NULL, 16);
}

static void link_name(int dirfd, const char *name, char *out, size_t len) {
    char target[512];
    ssize_t n = readlinkat(dirfd, name, target, sizeof target - 1);
    if (n <= 0) { out[0] = 0; return; }
    target[n] = 0;
    const char *base = strrchr(target, '/');
    snprintf(out, len, "%s", base ? base + 1 : target);
}

int pci_scan(const char *sysfs_root, pci_function *out, int capacity, int *count,
             char *err, int errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/bus/pci/devices", sysfs_root);
    int root = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(e));
        return -e;
    }
    DIR *dir = fdopendir(root);
    if (!dir) {
        int e = errno;
        close(root);
        snprintf(err, errlen, "cannot list %s: %s", path, strerror(e));
        return -e;
    }
    int n = 0;
    struct dirent *ent;
    while ((ent = readdir(dir)) != NULL) {
        if (ent->d_name[0] == '.') continue;
        if (n >= capacity) { n++; continue; }     /* count only: the caller retries larger */
        pci_function *f = &out[n++];
        memset(f, 0, sizeof *f);
        snprintf(f->address, sizeof f->address, "%s", ent->d_name);
        int fd = openat(root, ent->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0) { note(f, errno, "."); continue; }
        char buf[64];
        f->vendor = hex_attr(fd, f, "vendor", 1);
        f->device = hex_attr(fd, f, "device", 1);
        f->class_code = hex_attr(fd, f, "class", 1);
        f->subsystem_vendor = hex_attr(fd, f, "subsystem_vendor", 0);
        f->subsystem_device = hex_attr(fd, f, "subsystem_device", 0);
        f->revision = hex_attr(fd, f, "revision", 0);
        int e = read_attr(fd, "numa_node", buf, sizeof buf);
        f->numa_node = e ? -1 : atoi(buf);
        if (e && e != ENOENT) note(f, e, "numa_node");
        e = read_attr(fd, "current_link_speed", f->link_speed, sizeof f->link_speed);
        if (e) {
            f->link_speed[0] = 0;
            if (e != ENOENT && e != EINVAL) note(f, e, "current_link_speed");
        }
        e = read_attr(fd, "current_link_width", buf, sizeof buf);
        f->link_width = e ? -1 : atoi(buf);
        if (e && e != ENOENT && e != EINVAL) note(f, e, "current_link_width");
        link_name(fd, "driver", f->driver, sizeof f->driver);
        char group[64];
        link_name(fd, "iommu_group", group, sizeof group);
        f->iommu_group = group[0] ? atoi(group) : -1;
        close(fd);
    }
    closedir(dir);
    *count = n;
    if (n > capacity) {
        snprintf(err, errlen, "%d functions, room for %d", n, capacity);
        return -ENOSPC;
    }
    return 0;
}
"""
)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("agent.native._scan", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
