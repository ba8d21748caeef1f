using System.Diagnostics;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Storage;

/// <summary>vmsnap's locks and real QEMU's locks see each other, in both directions.</summary>
[Trait("Category", "Unit")]
public class ImageLockTests
{
    private static Process StartQemuHolding(string image, bool readOnly)
    {
        var psi = new ProcessStartInfo(Tool.Find("qemu-system-x86_64"))
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (string a in new[] { "-machine", "none", "-nodefaults", "-display", "none", "-S", "-monitor", "stdio",
                     "-drive", $"file={image},if=none,id=d0,format=qcow2{(readOnly ? ",readonly=on" : "")}" })
            psi.ArgumentList.Add(a);
        var p = Tool.Start(psi);
        // The monitor prompt appears once the drive is open (and locked).
        var sw = Stopwatch.StartNew();
        var buf = new char[256];
        string seen = "";
        while (!seen.Contains("(qemu)") && sw.Elapsed < TimeSpan.FromSeconds(20) && !p.HasExited)
        {
            int n = p.StandardOutput.Read(buf, 0, buf.Length);
            if (n <= 0) break;
            seen += new string(buf, 0, n);
        }
        if (p.HasExited) Assert.Fail("QEMU exited: " + p.StandardError.ReadToEnd());
        return p;
    }

    private static void Stop(Process p)
    {
        try { p.Kill(); } catch (InvalidOperationException) { }
        p.WaitForExit();
        p.Dispose();
    }

    [QemuFact]
    public void A_running_QEMU_blocks_vmsnap_writes_and_reads_but_not_force_share()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.QemuImg("create", "-f", "qcow2", image, "16M");
        byte[] before = File.ReadAllBytes(image);
        var qemu = StartQemuHolding(image, readOnly: false);
        try
        {
            var e = Assert.Throws<ImageInUseException>(() => FileBlockDevice.Open(image, new() { Writable = true, Lock = ImageLockMode.Write }));
            Assert.Contains("in use", e.Message);
            Assert.Throws<ImageInUseException>(() => FileBlockDevice.Open(image, new() { Lock = ImageLockMode.Read }));
            using (FileBlockDevice.Open(image, new() { Lock = ImageLockMode.ForceShare })) { }
        }
        finally { Stop(qemu); }
        Assert.Equal(before, File.ReadAllBytes(image));
        // Once QEMU is gone the image can be opened for writing.
        using (FileBlockDevice.Open(image, new() { Writable = true, Lock = ImageLockMode.Write })) { }
    }

    [QemuFact]
    public void A_read_only_QEMU_blocks_vmsnap_writes_only()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.QemuImg("create", "-f", "qcow2", image, "16M");
        var qemu = StartQemuHolding(image, readOnly: true);
        try
        {
            Assert.Throws<ImageInUseException>(() => FileBlockDevice.Open(image, new() { Writable = true, Lock = ImageLockMode.Write }));
            using (FileBlockDevice.Open(image, new() { Lock = ImageLockMode.Read })) { }
        }
        finally { Stop(qemu); }
    }

    [QemuFact]
    public void While_vmsnap_writes_QEMU_cannot_open_the_image_for_writing()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.QemuImg("create", "-f", "qcow2", image, "16M");
        using (FileBlockDevice.Open(image, new() { Writable = true, Lock = ImageLockMode.Write }))
        {
            var io = Tool.Run("qemu-io", ["-f", "qcow2", "-c", "write 0 4k", image]);
            Assert.NotEqual(0, io.ExitCode);
            Assert.Contains("lock", io.Stderr + io.Stdout);
            var info = Tool.Run("qemu-img", ["info", image]);
            Assert.NotEqual(0, info.ExitCode);
            Assert.Equal(0, Tool.Run("qemu-img", ["info", "-U", image]).ExitCode);
        }
        // Locks go with the descriptor.
        Assert.Equal(0, Tool.Run("qemu-io", ["-f", "qcow2", "-c", "write 0 4k", image]).ExitCode);
    }

    [QemuFact]
    public void While_vmsnap_reads_QEMU_can_read_but_not_write()
    {
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        Tool.QemuImg("create", "-f", "qcow2", image, "16M");
        using (FileBlockDevice.Open(image, new() { Lock = ImageLockMode.Read }))
        {
            Assert.NotEqual(0, Tool.Run("qemu-io", ["-f", "qcow2", "-c", "write 0 4k", image]).ExitCode);
            Assert.Equal(0, Tool.Run("qemu-img", ["info", image]).ExitCode);
        }
    }
}
