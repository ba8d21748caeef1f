using System.Diagnostics;
using Vmsnap.Migration;

namespace Vmsnap.Cli;

/// <summary>
/// A one-line progress display on stderr for long operations, drawn only when stderr is a terminal
/// (never into logs or pipes) and at most ten times a second. The total is given at the start (save)
/// or by the stream once its block list is read (load, export, import).
/// </summary>
internal sealed class ProgressLine : IRamProgress, IDisposable
{
    private readonly string _label;
    private long _total;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly bool _enabled;
    private long _lastDraw = -1;
    private long _done;
    private bool _drawn;

    private ProgressLine(string label, long total, bool enabled)
    {
        _label = label;
        _total = total;
        _enabled = enabled;
    }

    /// <summary>A progress line for <paramref name="label"/>; silent when JSON is asked for or stderr is not a terminal.</summary>
    internal static ProgressLine Start(string label, long total, bool quiet) =>
        new(label, total, !quiet && !Console.IsErrorRedirected);

    public void Report(long value)
    {
        _done = value;
        if (!_enabled) return;
        long now = _clock.ElapsedMilliseconds;
        if (_lastDraw >= 0 && now - _lastDraw < 100) return;
        _lastDraw = now;
        Draw(now);
    }

    public void ReportTotal(long ramBytes) => _total = ramBytes;

    private void Draw(long nowMs)
    {
        double mib = _done / (double)(1 << 20);
        double rate = nowMs > 0 ? mib / (nowMs / 1000.0) : 0;
        string amount = _total > 0
            ? $"{Cli.FormatSize(_done)} / {Cli.FormatSize(_total)} ({100.0 * Math.Min(_done, _total) / _total:0}%)"
            : Cli.FormatSize(_done);
        Console.Error.Write($"\r{_label}: {amount}, {rate:0} MiB/s\u001b[K");
        _drawn = true;
    }

    public void Dispose()
    {
        if (_drawn) Console.Error.Write("\r\u001b[K");
    }
}
