using System.Diagnostics;

namespace Vmsnap.Tests.Interop;

/// <summary>Runs the real QEMU tools. A missing tool fails the test (never skips it): interop is the proof.</summary>
internal static class Tool
{
    internal sealed record Result(int ExitCode, string Stdout, string Stderr);

    /// <summary>
    /// Absolute path of a program: QEMU's programs from the version the test uses (<see cref="QemuInstall.Current"/>),
    /// others from PATH; a missing one is a failure saying how to install it.
    /// </summary>
    internal static string Find(string program)
    {
        if (QemuInstall.IsQemuProgram(program)) return QemuInstall.Current.Path(program);
        return FindOnPath(program) ?? throw new InvalidOperationException($"'{program}' is not on PATH");
    }

    /// <summary>Absolute path of a program on PATH, or null.</summary>
    internal static string? FindOnPath(string program)
    {
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            string candidate = Path.Combine(dir, program);
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }

    private static readonly object SpawnLock = new();

    /// <summary>
    /// Starts a child process, one at a time across the test run. From its fork to its exec a child holds a copy of
    /// every descriptor of this process, and with it the OFD locks of images other tests have open: an image a test
    /// has just closed would still look locked to the QEMU that test starts next. Process.Start returns once the
    /// child has exec'd (and dropped those copies), so starting children one at a time closes that window.
    /// </summary>
    internal static Process Start(ProcessStartInfo psi)
    {
        lock (SpawnLock) return Process.Start(psi) ?? throw new InvalidOperationException($"{psi.FileName} did not start");
    }

    /// <summary>Starts <paramref name="process"/> as <see cref="Start(ProcessStartInfo)"/> does.</summary>
    internal static void Start(Process process)
    {
        lock (SpawnLock) process.Start();
    }

    /// <summary>Runs a program to completion (with a timeout) and returns its exit code and output.</summary>
    internal static Result Run(string program, IEnumerable<string> args, TimeSpan? timeout = null, string? stdinFile = null)
    {
        string path = Find(program);
        Result r = RunPath(path, args, timeout, stdinFile);
        // Children start one at a time (see Start), which should leave no moment where a closed image still looks
        // locked; these retries stay as a second guard for a child started outside Start. A lock that lasts (QEMU
        // holding the image, a descriptor left open) still fails after them.
        bool lockable = program is "qemu-img" or "qemu-io";
        for (int retry = 0; retry < 5 && lockable && r.ExitCode != 0 && r.Stderr.Contains("Failed to get", StringComparison.Ordinal) && r.Stderr.Contains("lock", StringComparison.Ordinal); retry++)
        {
            Thread.Sleep(200);
            r = RunPath(path, args, timeout, stdinFile);
        }
        return r;
    }

    /// <summary>Runs the program at <paramref name="path"/> to completion (with a timeout).</summary>
    internal static Result RunPath(string path, IEnumerable<string> args, TimeSpan? timeout = null, string? stdinFile = null)
    {
        string program = Path.GetFileName(path);
        var psi = new ProcessStartInfo(path)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = stdinFile is not null,
            UseShellExecute = false,
        };
        foreach (string a in args) psi.ArgumentList.Add(a);
        using var p = Start(psi);
        if (stdinFile is not null)
        {
            using (var f = File.OpenRead(stdinFile)) f.CopyTo(p.StandardInput.BaseStream);
            p.StandardInput.Close();
        }
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout ?? TimeSpan.FromMinutes(5)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{program} {string.Join(' ', args)} did not finish in time");
        }
        p.WaitForExit();
        return new Result(p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>Runs a program and fails with its stderr unless it exits with 0; returns stdout.</summary>
    internal static string Check(string program, params string[] args)
    {
        Result r = Run(program, args);
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"{program} {string.Join(' ', args)} exited with {r.ExitCode}: {r.Stderr}{r.Stdout}");
        return r.Stdout;
    }

    internal static string QemuImg(params string[] args) => Check("qemu-img", args);

    internal static string QemuIo(params string[] args) => Check("qemu-io", args);
}

/// <summary>A scratch folder removed with everything in it when disposed.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "vmsnap-tests", Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { }
    }
}
