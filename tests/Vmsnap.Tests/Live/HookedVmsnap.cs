using System.Diagnostics;
using System.Text;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Live;

/// <summary>A vmsnap process (the managed program: the hook needs it) that the test kills.</summary>
internal sealed class HookedVmsnap : IDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _output = new();
    private readonly ManualResetEventSlim _paused = new();

    private HookedVmsnap(Process process) => _process = process;

    public bool HasExited => _process.HasExited;

    public int Pid => _process.Id;

    public string Output
    {
        get
        {
            lock (_output) return _output.ToString();
        }
    }

    /// <summary>
    /// Starts vmsnap; with <paramref name="pauseAt"/> the hook stops it there, with <paramref name="failReadsAt"/> the snapshot's
    /// served reads fail from there on, with <paramref name="slowReadsAt"/> they are slowed from there on (see <see cref="LiveKillHook"/>).
    /// </summary>
    /// <param name="args">vmsnap's arguments.</param>
    /// <param name="pauseAt">The phase the hook stops vmsnap at, or null.</param>
    /// <param name="failReadsAt">The phase the served reads fail from, or null.</param>
    /// <param name="slowReadsAt">The phase the served reads are slowed from, or null.</param>
    /// <param name="trace">Run with VMSNAP_LIVE_TRACE=1: every phase mark is in <see cref="Output"/> (<see cref="WaitForOutput"/>).</param>
    public static HookedVmsnap Start(string[] args, string? pauseAt, string? failReadsAt = null, string? slowReadsAt = null, bool trace = false)
    {
        ProcessStartInfo psi = VmsnapCli.StartInfo(args, VmsnapCli.Managed);
        if (trace) psi.Environment["VMSNAP_LIVE_TRACE"] = "1";
        psi.RedirectStandardError = true;
        psi.RedirectStandardOutput = true;
        if (pauseAt is not null || failReadsAt is not null || slowReadsAt is not null)
            psi.Environment["DOTNET_STARTUP_HOOKS"] = typeof(StartupHook).Assembly.Location;
        if (pauseAt is not null) psi.Environment[LiveKillHook.PauseVariable] = pauseAt;
        if (failReadsAt is not null) psi.Environment[LiveKillHook.FailReadsVariable] = failReadsAt;
        if (slowReadsAt is not null) psi.Environment[LiveKillHook.SlowReadsVariable] = slowReadsAt;
        var running = new HookedVmsnap(new Process { StartInfo = psi });
        void Line(string? line)
        {
            if (line is null) return;
            lock (running._output) running._output.AppendLine(line);
            if (line.StartsWith(LiveKillHook.PausedLine, StringComparison.Ordinal) || line.StartsWith(LiveKillHook.SlowedLine, StringComparison.Ordinal)) running._paused.Set();
        }
        running._process.ErrorDataReceived += (_, e) => Line(e.Data);
        running._process.OutputDataReceived += (_, e) => Line(e.Data);
        Tool.Start(running._process);
        running._process.BeginErrorReadLine();
        running._process.BeginOutputReadLine();
        return running;
    }

    /// <summary>Waits until the hook says the process stopped (or its reads slowed) where asked.</summary>
    public void WaitPaused(string what)
    {
        var clock = Stopwatch.StartNew();
        while (!_paused.Wait(100))
        {
            Assert.False(_process.HasExited, $"{what}: vmsnap ended before the hook stopped it (exit {(_process.HasExited ? _process.ExitCode : 0)}): {Output}");
            Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2), $"{what}: the hook did not stop vmsnap: {Output}");
        }
    }

    /// <summary>Waits until <paramref name="text"/> is in the output (a trace mark, say).</summary>
    public void WaitForOutput(string text)
    {
        var clock = Stopwatch.StartNew();
        while (!Output.Contains(text, StringComparison.Ordinal))
        {
            Assert.False(_process.HasExited, $"vmsnap ended before printing '{text}': {Output}");
            Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2), $"vmsnap did not print '{text}': {Output}");
            Thread.Sleep(10);
        }
    }

    /// <summary>Waits for the process to end by itself (at most two minutes); returns its exit code.</summary>
    public int WaitExit()
    {
        Assert.True(_process.WaitForExit(TimeSpan.FromMinutes(2)), $"vmsnap did not end: {Output}");
        _process.WaitForExit();   // and its output is read to the end
        return _process.ExitCode;
    }

    /// <summary>SIGKILL, and waits until the process is gone (its descriptors and locks with it).</summary>
    public void Kill()
    {
        Assert.False(_process.HasExited, $"vmsnap ended before the kill: {Output}");
        _process.Kill();
        _process.WaitForExit();
    }

    public void Dispose()
    {
        if (!_process.HasExited) _process.Kill(entireProcessTree: true);
        _process.Dispose();
        _paused.Dispose();
    }
}
