using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Native;

/// <summary>
/// How the tests start the vmsnap command: the dotnet tool's vmsnap.dll through dotnet by default, or, with
/// <c>VMSNAP_BIN=/path/to/vmsnap</c>, that executable (the native one packaging/build-deb.sh builds; tests/run.sh
/// runs the command-line tests a second time that way).
/// </summary>
internal static class VmsnapBinary
{
    private static readonly Lazy<string?> s_native = new(() =>
    {
        string? path = Environment.GetEnvironmentVariable("VMSNAP_BIN");
        if (string.IsNullOrEmpty(path)) return null;
        path = Path.GetFullPath(path);
        if (!File.Exists(path)) throw new InvalidOperationException($"VMSNAP_BIN={path}: no such file");
        return path;
    });

    /// <summary>The native executable VMSNAP_BIN names, or null when the tests run vmsnap.dll.</summary>
    public static string? Native => s_native.Value;

    /// <summary>The program to start (absolute path).</summary>
    public static string Program => Native ?? Tool.Find("dotnet");

    /// <summary>The program's arguments before vmsnap's own (vmsnap.dll for dotnet, none for the native executable).</summary>
    public static string[] Prefix => Native is null ? [Path.Combine(AppContext.BaseDirectory, "vmsnap.dll")] : [];

    /// <summary>Program, prefix and <paramref name="args"/>: a whole command line.</summary>
    public static string[] CommandLine(params string[] args) => [Program, .. Prefix, .. args];

    /// <summary>The command as a shell word list, for <c>sh -c</c> strings (paths quoted).</summary>
    public static string Shell => string.Join(' ', CommandLine().Select(a => $"'{a.Replace("'", "'\\''", StringComparison.Ordinal)}'"));

    /// <summary>Runs vmsnap to completion (<see cref="Tool.RunPath"/>).</summary>
    public static Tool.Result Run(string[] args, TimeSpan? timeout = null) => Tool.RunPath(Program, [.. Prefix, .. args], timeout);
}
