/* What a GPU container of the real-node test runs (static, the whole image): lists /dev/nvidia*
 * as the container sees them and checks that the device the CDI spec injected is there.
 *
 * For each /dev/nvidia* entry it prints "<path> char <major>:<minor> open=<errno name or ok>" and
 * the COHDI_GPU_BDF the spec set. Opening the stand-in nodes fails with ENXIO (no driver behind
 * major 195) but must not fail with EPERM, which is what the device cgroup answers for a node the
 * runtime did not allow. Exit 0 when at least one /dev/nvidia<N> and /dev/nvidiactl are
 * character devices and none was refused; 1 otherwise. The report also goes to
 * /dev/termination-log, so it is in the pod's status. With the argument `--wait` it then waits
 * for SIGTERM (the pod's deletion) and exits with the same status.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static char report[8192];
static size_t used;

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(report + used, sizeof report - used, fmt, ap);
    va_end(ap);
    if (n > 0 && (size_t)n < sizeof report - used) used += (size_t)n;
}

static volatile sig_atomic_t stopping;

static void on_term(int sig) { (void)sig; stopping = 1; }

int main(int argc, char **argv) {
    int gpus = 0, ctl = 0, refused = 0;
    DIR *dev = opendir("/dev");
    if (dev == NULL) { perror("/dev"); return 1; }
    struct dirent *e;
    while ((e = readdir(dev)) != NULL) {
        if (strncmp(e->d_name, "nvidia", 6) != 0) continue;
        char path[300];
        snprintf(path, sizeof path, "/dev/%s", e->d_name);
        struct stat st;
        if (lstat(path, &st) != 0 || !S_ISCHR(st.st_mode)) {
            say("%s not-a-char-device\n", path);
            continue;
        }
        int fd = open(path, O_RDONLY | O_NONBLOCK);
        const char *how = fd >= 0 ? "ok" : errno == EPERM ? "EPERM" : errno == ENXIO ? "ENXIO"
                        : errno == ENODEV ? "ENODEV" : strerror(errno);
        if (fd >= 0) close(fd);
        if (fd < 0 && (errno == EPERM || errno == EACCES)) refused++;
        say("%s char %u:%u open=%s\n", path, major(st.st_rdev), minor(st.st_rdev), how);
        const char *rest = e->d_name + 6;
        if (strcmp(rest, "ctl") == 0) ctl = 1;
        else if (*rest && strspn(rest, "0123456789") == strlen(rest)) gpus++;
    }
    closedir(dev);
    const char *bdf = getenv("COHDI_GPU_BDF");
    say("COHDI_GPU_BDF=%s\n", bdf ? bdf : "(unset)");
    int ok = gpus >= 1 && ctl && refused == 0;
    say("result=%s\n", ok ? "ok" : "FAILED");
    fwrite(report, 1, used, stdout);
    FILE *term = fopen("/dev/termination-log", "w");
    if (term != NULL) { fwrite(report, 1, used, term); fclose(term); }
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "--wait") == 0) {
        signal(SIGTERM, on_term);
        while (!stopping) pause();
    }
    return ok ? 0 : 1;
}
