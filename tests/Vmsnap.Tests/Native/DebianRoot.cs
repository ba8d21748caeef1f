using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Native;

/// <summary>
/// A clean Debian 12 system in a folder, for the package tests: tests/install-deps.sh makes it once with
/// <c>debootstrap --variant=minbase</c> (no .NET in it) and keeps it as a tarball (<c>VMSNAP_DEBIAN_ROOT</c>);
/// each instance unpacks its own copy. Programs run in it with chroot, in a mount namespace of their own
/// (unshare): /proc, a fresh /dev/pts and the folders the test shares are mounted there only, and vanish
/// with the process, so nothing is left mounted on the host whatever happens. A shared folder appears at
/// the same path inside as outside: a QEMU outside and vmsnap inside name the same images and sockets.
/// Needs root, as tests/run.sh runs.
/// </summary>
internal sealed class DebianRoot : IDisposable
{
    private DebianRoot(string path) => Path = path;

    /// <summary>The root folder on the host.</summary>
    public string Path { get; }

    /// <summary>The package tests/run.sh built (<c>VMSNAP_DEB</c>: packaging/build-deb.sh's vmsnap_VERSION_amd64.deb).</summary>
    public static string Package => Variable("VMSNAP_DEB", "the .deb packaging/build-deb.sh builds");

    private static string Variable(string name, string what)
    {
        string? value = Environment.GetEnvironmentVariable(name);
        if (string.IsNullOrEmpty(value) || !File.Exists(value))
            throw new InvalidOperationException($"{name} must name {what} ({(string.IsNullOrEmpty(value) ? "unset" : $"no file {value}")}): tests/run.sh sets it");
        return value;
    }

    /// <summary>Unpacks a fresh copy of the clean Debian 12 root.</summary>
    public static DebianRoot Unpack()
    {
        string tarball = Variable("VMSNAP_DEBIAN_ROOT", "a tarball of a clean Debian 12 root (tests/install-deps.sh makes it)");
        string path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "vmsnap-debian-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(path);
        var root = new DebianRoot(path);
        try
        {
            Tool.Result r = Tool.RunPath(Tool.Find("tar"), ["-xzf", tarball, "-C", path, "--numeric-owner"], TimeSpan.FromMinutes(3));
            Assert.True(r.ExitCode == 0, $"tar -xzf {tarball} exited {r.ExitCode}: {r.Stderr}");
            return root;
        }
        catch
        {
            root.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Runs <paramref name="command"/> (a program inside the root and its arguments) chrooted, in <paramref name="cwd"/>
    /// (inside; "/" by default), with only a minimal environment (PATH, HOME, LANG: nothing of the host's .NET),
    /// the host folders <paramref name="share"/> mounted at the same paths. The process keeps the id it started
    /// with (each step execs the next), so a signal sent to it reaches the program.
    /// </summary>
    public Tool.Result Run(string[] command, string[]? share = null, string? cwd = null, TimeSpan? timeout = null) =>
        Tool.RunPath(Tool.Find("unshare"), Arguments(command, share ?? [], cwd ?? "/"), timeout ?? TimeSpan.FromMinutes(5));

    /// <summary>As <see cref="Run"/>, failing with the output unless the program exits with 0; returns stdout.</summary>
    public string Check(string[] command, string[]? share = null, string? cwd = null)
    {
        Tool.Result r = Run(command, share, cwd);
        Assert.True(r.ExitCode == 0, $"{string.Join(' ', command)} in the Debian root exited {r.ExitCode}:\n{r.Stdout}\n{r.Stderr}");
        return r.Stdout;
    }

    private const string Enter = """
        set -e
        root=$1 cwd=$2 shares=$3
        shift 3
        mount -t proc proc "$root/proc"
        mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
        for d in $shares; do mkdir -p "$root$d"; mount --bind "$d" "$root$d"; done
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
            /bin/sh -c 'cd "$0" && exec "$@"' "$cwd" "$@"
        """;

    private string[] Arguments(string[] command, string[] share, string cwd)
    {
        foreach (string d in share)
            if (!System.IO.Path.IsPathRooted(d) || d.Any(char.IsWhiteSpace)) throw new ArgumentException($"a shared folder must be an absolute path without spaces: '{d}'");
        return ["--mount", "--propagation", "private", "--", "/bin/sh", "-c", Enter, "sh", Path, cwd, string.Join(' ', share), .. command];
    }

    /// <summary>A file inside the root, by its path there (<c>/usr/bin/vmsnap</c>).</summary>
    public string HostPath(string inside) => System.IO.Path.Join(Path, inside);

    public void Dispose()
    {
        // Mounts live only in the namespaces of processes that ended; refuse to delete through one that did not.
        string mounts = File.ReadAllText("/proc/self/mountinfo");
        if (mounts.Contains(Path + "/", StringComparison.Ordinal))
            throw new InvalidOperationException($"something is mounted under {Path}; not deleting it");
        Tool.RunPath(Tool.Find("rm"), ["-rf", "--one-file-system", Path], TimeSpan.FromMinutes(2));
    }
}
