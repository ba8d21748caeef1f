using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Live;

/// <summary>The ticks around a save: the last one printed before it started, the first one printed after it returned.</summary>
internal sealed record SaveWindow(long Before, long After, string Boot)
{
    /// <summary>
    /// A guest restored from the save resumes with a tick inside the window: after <see cref="Before"/>,
    /// and at most one past <see cref="After"/> (the line of the tick at the stop may have been cut on the
    /// serial port by the stop, so the restored guest's first whole line can be the next one).
    /// </summary>
    public void AssertResumedIn(GuestTick first)
    {
        Assert.True(first.N > Before && first.N <= After + 1,
            $"the restored guest resumed at tick {first.N}, outside the save's window ({Before}, {After + 1}]");
        Assert.Equal(Boot, first.Boot);
    }
}

/// <summary>A snapshot as qemu-img lists it (qemu-img info --output=json).</summary>
internal sealed record ImageSnapshot(string Id, string Name, long VmStateSize, long DateSeconds, long VmClockNanoseconds, long? Icount);

/// <summary>Steps of the live tests: vmsnap savevm/loadvm as processes, windows, image listings, checks.</summary>
internal static class LiveKit
{
    /// <summary>
    /// Whether a live save of this QEMU restores the guest exactly. QEMU 7.2's own live migration of a TCG guest
    /// now and then sends a state that crashes the guest or changes its memory when loaded, with or without vmsnap
    /// (docs/live.md, "What the stress test found"); tests that restore a save and check the guest resumed exactly
    /// make that save stopped on QEMU 7.2, as docs/live.md advises users there.
    /// </summary>
    public static bool LiveSaveRestoresExactly => QemuInstall.Current.AtLeast(8, 0);

    /// <summary>Runs vmsnap savevm on the guest and returns its JSON and the window of ticks around it.</summary>
    public static (JsonElement Result, SaveWindow Window) SaveVm(TestGuest guest, string tag, bool live, params string[] more)
    {
        GuestTick before = guest.LastTick();
        JsonElement r = VmsnapJson(["savevm", "--qmp", guest.VmsnapSocket, tag, .. live ? new[] { "--live" } : [], .. more, "--json"]);
        long returned = guest.LastTick().N;
        GuestTick after = guest.WaitForTick(t => t.N > returned);
        return (r, new SaveWindow(before.N, after.N, before.Boot));
    }

    /// <summary>Checks a restored guest: resumes inside the window, same boot, disks read back right, memory region intact, and it keeps counting.</summary>
    public static void AssertResumes(TestGuest restored, SaveWindow window)
    {
        GuestTick first = restored.WaitForTick(_ => true);
        window.AssertResumedIn(first);
        GuestTick summed = restored.WaitForTick(t => t.Sum is not null);
        Assert.Equal(TestGuest.ExpectedFillSum, summed.Sum);
        var ticks = restored.Ticks();
        foreach (GuestTick t in ticks)
        {
            Assert.Equal(window.Boot, t.Boot);
            Assert.True(t.Disks == "ok", $"tick {t.N} after the restore: the disks did not read back what the guest wrote ({t.Disks})");
        }
        for (int i = 1; i < ticks.Count; i++) Assert.Equal(ticks[i - 1].N + 1, ticks[i].N);
    }

    /// <summary>The snapshots of an image as qemu-img lists them (-U: QEMU may hold it).</summary>
    public static List<ImageSnapshot> Snapshots(string image)
    {
        using var doc = JsonDocument.Parse(Tool.QemuImg("info", "-U", "--output=json", image));
        var list = new List<ImageSnapshot>();
        if (!doc.RootElement.TryGetProperty("snapshots", out JsonElement snaps)) return list;
        foreach (JsonElement s in snaps.EnumerateArray())
        {
            long? icount = s.TryGetProperty("icount", out JsonElement ic) ? ic.GetInt64() : null;
            list.Add(new ImageSnapshot(s.GetProperty("id").GetString()!, s.GetProperty("name").GetString()!, s.GetProperty("vm-state-size").GetInt64(),
                s.GetProperty("date-sec").GetInt64(), s.GetProperty("vm-clock-sec").GetInt64() * 1_000_000_000 + s.GetProperty("vm-clock-nsec").GetInt64(), icount));
        }
        return list;
    }

    /// <summary>One line per snapshot (ID, name, VM-state size, date, clock): equal strings mean unchanged snapshots.</summary>
    public static string Listing(string image) =>
        string.Join("\n", Snapshots(image).Select(s => $"{s.Id} {s.Name} {s.VmStateSize} {s.DateSeconds} {s.VmClockNanoseconds}"));

    /// <summary>SHA-256 of a snapshot's VM-state bytes, read through vmsnap's engine (shared: QEMU may hold the image).</summary>
    public static string VmStateHash(string image, string tag)
    {
        using var img = Vmsnap.Qcow2.Qcow2Image.Open(image, new Vmsnap.Qcow2.Qcow2OpenOptions { ForceShare = true });
        using var area = img.OpenVmStateAreaForReading(tag);
        using var hash = System.Security.Cryptography.IncrementalHash.CreateHash(System.Security.Cryptography.HashAlgorithmName.SHA256);
        byte[] buffer = new byte[1 << 20];
        for (long at = 0; at < area.Length; at += buffer.Length)
        {
            int n = area.Read(buffer, at);
            hash.AppendData(buffer, 0, n);
        }
        return Convert.ToHexString(hash.GetHashAndReset());
    }

    /// <summary>Starts vmsnap as a process without waiting (for failures injected while it runs).</summary>
    public static RunningVmsnap Start(params string[] args) => RunningVmsnap.Start(args);

    /// <summary>QEMU's current max-bandwidth migration parameter.</summary>
    public static long MaxBandwidth(QemuVm vm) => vm.Execute("query-migrate-parameters")!["max-bandwidth"]!.GetValue<long>();
}

/// <summary>A vmsnap process started in the background, SIGXFSZ ignored (so a file-size limit makes writes fail instead of killing it).</summary>
internal sealed class RunningVmsnap : IDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _stdout = new(), _stderr = new();

    private RunningVmsnap(Process process) => _process = process;

    public int Pid => _process.Id;

    public static RunningVmsnap Start(string[] args)
    {
        // sh sets SIGXFSZ to ignored and execs: an ignored signal stays ignored in the new program.
        var psi = VmsnapCli.StartInfo(args, ["/bin/sh", "-c", "trap '' XFSZ; exec \"$0\" \"$@\"", .. VmsnapCli.Command]);
        psi.RedirectStandardOutput = true;
        psi.RedirectStandardError = true;
        var p = new Process { StartInfo = psi };
        var running = new RunningVmsnap(p);
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (running._stdout) running._stdout.AppendLine(e.Data); };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (running._stderr) running._stderr.AppendLine(e.Data); };
        Tool.Start(p);
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        return running;
    }

    /// <summary>Waits for the exit; returns the exit code and output.</summary>
    public Tool.Result Wait(TimeSpan? timeout = null)
    {
        if (!_process.WaitForExit(timeout ?? TimeSpan.FromMinutes(3)))
        {
            _process.Kill(entireProcessTree: true);
            throw new TimeoutException("vmsnap did not finish in time");
        }
        _process.WaitForExit();
        lock (_stdout) lock (_stderr) return new Tool.Result(_process.ExitCode, _stdout.ToString(), _stderr.ToString());
    }

    public bool HasExited => _process.HasExited;

    /// <summary>Sends SIGTERM, as a service manager stopping vmsnap would.</summary>
    public void Terminate() => Native.Kill(_process.Id, Native.SIGTERM);

    /// <summary>Lowers the process's file-size limit (RLIMIT_FSIZE): its writes past <paramref name="bytes"/> then fail with EFBIG, as on a full disk.</summary>
    public void LimitFileSize(long bytes) => Native.SetFileSizeLimit(_process.Id, bytes);

    public void Dispose()
    {
        if (!_process.HasExited) _process.Kill(entireProcessTree: true);
        _process.Dispose();
    }
}

internal static partial class Native
{
    public const int SIGTERM = 15, SIGKILL = 9;
    private const int RLIMIT_FSIZE = 1;

    [StructLayout(LayoutKind.Sequential)]
    private struct RLimit
    {
        public ulong Current;
        public ulong Max;
    }

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int kill(int pid, int signal);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int prlimit64(int pid, int resource, ref RLimit newLimit, IntPtr oldLimit);

    public static void Kill(int pid, int signal)
    {
        if (kill(pid, signal) != 0) throw new InvalidOperationException($"kill({pid}, {signal}) failed: {Marshal.GetLastPInvokeError()}");
    }

    public static void SetFileSizeLimit(int pid, long bytes)
    {
        var limit = new RLimit { Current = (ulong)bytes, Max = ulong.MaxValue };
        if (prlimit64(pid, RLIMIT_FSIZE, ref limit, IntPtr.Zero) != 0)
            throw new InvalidOperationException($"prlimit({pid}, RLIMIT_FSIZE) failed: {Marshal.GetLastPInvokeError()}");
    }
}
