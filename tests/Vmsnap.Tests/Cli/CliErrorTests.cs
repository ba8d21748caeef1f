using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Qcow2;

namespace Vmsnap.Tests.Cli;

/// <summary>
/// What the command line adds to the library's errors, from their properties rather than their text: the repair
/// hint for an image that must be repaired first (<see cref="Qcow2FormatException.RepairNeeded"/>), and the unknown
/// word of a command line the parser could not match.
/// </summary>
[Trait("Category", "Unit")]
public class CliErrorTests
{
    private static Tool.Result Vmsnap(params string[] args) => VmsnapCli.Run([.. args], TimeSpan.FromMinutes(2));

    private static string OneLineError(Tool.Result r, int exitCode)
    {
        Assert.True(r.ExitCode == exitCode, $"exit {r.ExitCode}, wanted {exitCode}: {r.Stderr}");
        string[] lines = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(lines.Length == 1, $"stderr should be one line: {r.Stderr}");
        Assert.StartsWith("vmsnap: ", lines[0]);
        return lines[0];
    }

    [QemuFact]
    public void A_change_to_an_image_marked_corrupt_says_how_to_repair_it_and_an_image_with_bitmaps_does_not()
    {
        using var dir = new TempDir();
        string image = dir.File("corrupt.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 0x11 0 64k");
        Qemu.WriteBE64(image, Qcow2Header.IncompatibleFeaturesOffset, Qcow2Header.IncompatibleCorrupt);
        string hash = Qemu.Hash(image);
        string said = OneLineError(Vmsnap("snapshot", "create", image, "s"), 1);
        Assert.Contains("marked corrupt", said);
        Assert.EndsWith("repair it first (run 'vmsnap check --repair all')", said);
        Assert.Equal(hash, Qemu.Hash(image));

        // What the hint says works: the repair clears the bit (the image is consistent), as qemu-img check -r all does.
        Assert.Equal(0, Vmsnap("check", image, "--repair", "all").ExitCode);
        Assert.Equal(0, Vmsnap("snapshot", "create", image, "s").ExitCode);
        QemuImgCheck.AssertClean(image);

        string bitmaps = dir.File("bitmaps.qcow2");
        Tool.QemuImg("create", "-q", "-f", "qcow2", bitmaps, "64M");
        Tool.QemuImg("bitmap", "--add", bitmaps, "b0");
        string refused = OneLineError(Vmsnap("snapshot", "create", bitmaps, "s"), 1);
        Assert.Contains("bitmap", refused);
        Assert.DoesNotContain("--repair", refused);
    }

    [Fact]
    public void An_unknown_word_is_named_rather_than_the_missing_command()
    {
        Assert.Equal("vmsnap: Unrecognized command or argument 'frobnicate'.", OneLineError(Vmsnap("snapshot", "frobnicate", "x.qcow2"), 2));
        Assert.Equal("vmsnap: Unrecognized command or argument '--nosuch'.", OneLineError(Vmsnap("info", "x.qcow2", "--nosuch"), 2));
        Assert.Contains("Required command was not provided", OneLineError(Vmsnap("snapshot"), 2));
    }

    [Fact]
    public void Force_share_with_a_repair_is_refused_in_the_command_lines_words()
    {
        using var dir = new TempDir();
        Assert.Equal("vmsnap: --force-share cannot be used with --repair", OneLineError(Vmsnap("check", dir.File("none.qcow2"), "-U", "--repair", "all"), 1));
    }
}
