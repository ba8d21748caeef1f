namespace Vmsnap.Storage.LowLevel;

/// <summary>
/// Where a file that replaces another is written first: a hidden, uniquely named file in the same
/// folder, renamed over the target once complete (same file system, so the rename is atomic).
/// </summary>
public static class ScratchFile
{
    /// <summary>A new scratch path beside <paramref name="target"/>: <c>.NAME.vmsnap-GUID.tmp</c>.</summary>
    public static string Beside(string target)
    {
        string full = Path.GetFullPath(target);
        return Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.vmsnap-{Guid.NewGuid():N}.tmp");
    }
}
