using System.Diagnostics;

namespace Vmsnap.Tests.Interop;

/// <summary>
/// The one way tests start the vmsnap command as a process: <c>dotnet vmsnap.dll</c> from the test's output folder, or,
/// when <c>VMSNAP_BIN</c> names an executable (a native build of vmsnap), that executable, so the CLI tests run against
/// it unchanged. (<see cref="Managed"/> is for the few tests that need the managed program itself.)
/// </summary>
internal static class VmsnapCli
{
    private static readonly Lazy<string[]> s_command = new(() =>
    {
        string? bin = Environment.GetEnvironmentVariable("VMSNAP_BIN");
        if (string.IsNullOrEmpty(bin)) return Managed;
        string path = Path.GetFullPath(bin);
        if (!File.Exists(path)) throw new InvalidOperationException($"VMSNAP_BIN={bin}: no such file");
        return [path];
    });

    /// <summary>The program and its first arguments: <c>[VMSNAP_BIN]</c> or <c>[dotnet, vmsnap.dll]</c>.</summary>
    public static IReadOnlyList<string> Command => s_command.Value;

    /// <summary>
    /// Always <c>[dotnet, vmsnap.dll]</c>, whatever VMSNAP_BIN says: for a test that loads code into the managed
    /// program (a DOTNET_STARTUP_HOOKS hook), which a native executable cannot take.
    /// </summary>
    public static string[] Managed => [Tool.Find("dotnet"), Path.Combine(AppContext.BaseDirectory, "vmsnap.dll")];

    /// <summary>The command as one shell word list, for <c>sh -c</c> pipelines.</summary>
    public static string Shell => string.Join(' ', Command.Select(a => "'" + a.Replace("'", "'\\''", StringComparison.Ordinal) + "'"));

    /// <summary>Start info for <c>vmsnap <paramref name="args"/></c> (no redirection: the caller sets what it reads).</summary>
    public static ProcessStartInfo StartInfo(IEnumerable<string> args, IReadOnlyList<string>? command = null)
    {
        command ??= Command;
        var psi = new ProcessStartInfo(command[0]) { UseShellExecute = false };
        foreach (string a in command.Skip(1).Concat(args)) psi.ArgumentList.Add(a);
        return psi;
    }

    /// <summary>Runs <c>vmsnap <paramref name="args"/></c> to completion (with a timeout).</summary>
    public static Tool.Result Run(IEnumerable<string> args, TimeSpan? timeout = null) =>
        Tool.RunPath(Command[0], [.. Command.Skip(1), .. args], timeout);
}
