/* The floor for the PCI scan: only the open/read/close (and readlink) calls the scan makes, for
 * the same attributes of every function under <root>/bus/pci/devices, no parsing, no structs.
 * Usage: floor <sysfs-root> <rounds>; prints nanoseconds per function (median round). */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *attrs[] = {"vendor", "device", "class", "subsystem_vendor", "subsystem_device",
                              "revision", "numa_node", "current_link_speed", "current_link_width"};

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    char path[4096];
    snprintf(path, sizeof path, "%s/bus/pci/devices", argv[1]);
    int rounds = atoi(argv[2]);
    double *per = calloc(rounds, sizeof *per);
    char buf[64], link[512];
    for (int r = 0; r < rounds; r++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int root = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *dir = fdopendir(root);
        struct dirent *e;
        int n = 0;
        while ((e = readdir(dir))) {
            if (e->d_name[0] == '.') continue;
            int fd = openat(root, e->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            for (size_t i = 0; i < sizeof attrs / sizeof *attrs; i++) {
                int a = openat(fd, attrs[i], O_RDONLY | O_CLOEXEC);
                if (a >= 0) { if (read(a, buf, sizeof buf - 1) < 0) {} close(a); }
            }
            if (readlinkat(fd, "driver", link, sizeof link) < 0) {}
            if (readlinkat(fd, "iommu_group", link, sizeof link) < 0) {}
            close(fd);
            n++;
        }
        closedir(dir);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        per[r] = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (n ? n : 1);
    }
    qsort(per, rounds, sizeof *per, cmp);
    printf("%.0f\n", per[rounds / 2]);
    return 0;
}
