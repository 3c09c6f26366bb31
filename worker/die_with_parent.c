/*
 * die-with-parent PROGRAM [ARG...]
 *
 * Runs PROGRAM (a path, not searched for on PATH) so that the kernel sends it SIGKILL when
 * the thread that started die-with-parent dies: it sets the parent-death signal
 * (prctl PR_SET_PDEATHSIG, which an exec keeps) and execs PROGRAM in its place. A worker
 * starts every ffmpeg through it, so that no ffmpeg outlives its worker, whatever killed
 * the worker. `setpriv --pdeathsig KILL --` (util-linux) does the same, and is what
 * worker/media.py falls back to when this program was not built.
 *
 * Why a program of our own: a copy clip costs ffmpeg ~60 ms of CPU, and setpriv, a
 * dynamically linked program that sets up its locale, adds ~1 ms to every start. This one
 * has no C library at all (three system calls, then the exec: nothing to load, relocate or
 * initialise), and costs about what the exec of a tiny file costs: too little to measure
 * against a bare start (bench/launch.py). A statically linked glibc version costs ~0.3 ms.
 *
 * Exit status, as setpriv's: 126 when the signal cannot be set (or the parent died before
 * it was), 127 when PROGRAM cannot be executed; either with a line on stderr.
 *
 * Built by setup.py for x86-64 and AArch64 (cc -static -nostdlib); on another architecture
 * the build skips it, and setpriv is used. tests/test_die_with_parent.py runs both builds,
 * the AArch64 one under qemu-user.
 */

#define PR_SET_PDEATHSIG 1
#define SIGKILL 9

#if defined(__x86_64__)
#define NR_write 1
#define NR_execve 59
#define NR_getppid 110
#define NR_prctl 157
#define NR_exit_group 231

static long sys(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return r;
}

/* The kernel starts us with argc, argv[], NULL, envp[], NULL on the stack. */
__asm__(".text\n"
        ".globl _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call start\n"
        "  hlt\n");

#elif defined(__aarch64__)
#define NR_write 64
#define NR_execve 221
#define NR_getppid 173
#define NR_prctl 167
#define NR_exit_group 94

static long sys(long n, long a, long b, long c)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    __asm__ volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    return x0;
}

__asm__(".text\n"
        ".globl _start\n"
        "_start:\n"
        "  mov x29, #0\n"
        "  mov x30, #0\n"
        "  mov x0, sp\n"
        "  bl start\n"
        "  brk #0\n");

#else
#error "no raw system calls for this architecture: clip-supervisor uses setpriv instead"
#endif

static void say(const char *text)
{
    long n = 0;
    while (text[n])
        n++;
    sys(NR_write, 2, (long)text, n);
}

static void __attribute__((noreturn)) leave(int status)
{
    for (;;)
        sys(NR_exit_group, status, 0, 0);
}

void __attribute__((noreturn, used)) start(long *stack)
{
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    char **envp = argv + argc + 1;
    long parent = sys(NR_getppid, 0, 0, 0);

    if (argc < 2) {
        say("usage: die-with-parent PROGRAM [ARG...]\n");
        leave(126);
    }
    if (sys(NR_prctl, PR_SET_PDEATHSIG, SIGKILL, 0) != 0) {
        say("die-with-parent: cannot set the parent-death signal\n");
        leave(126);
    }
    /* A parent that died before the signal was set would never send it. */
    if (sys(NR_getppid, 0, 0, 0) != parent) {
        say("die-with-parent: the parent died before the signal was set\n");
        leave(126);
    }
    sys(NR_execve, (long)argv[1], (long)(argv + 1), (long)envp);
    say("die-with-parent: failed to execute ");
    say(argv[1]);
    say("\n");
    leave(127);
}
